"""gunicorn settings for LightTTS: gunicorn reads this file from the directory it starts in (the
repository root: scripts/run.sh, scripts/deploy.sh, the README's and seed 000's commands), unless
-c names another. It sets no gunicorn option; it adds one check.

on_starting runs in the master before it listens or forks a worker. What would stop every worker at
boot stops gunicorn here, with one line in its error log (--error-logfile) and exit code 2, instead
of gunicorn forking workers that fail: server settings from the environment that the server refuses
(MODEL_DIR that is not a model directory, ...), --load_trt on a machine without an NVIDIA GPU or
without TensorRT, and a -b other than loopback without LIGHTTTS_API_KEY (or ALLOW_OPEN=true).
Without this file (gunicorn started elsewhere, or -c another file), wsgi_wrapper.py makes the same
checks in each worker: the first to fail logs the line and exits with gunicorn's boot-error code 3,
which halts the master.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def on_starting(server):
    from light_tts.server.api_server import startup_errors
    from light_tts.server.args import ConfigError, args_from_env
    hosts = [a[0] for a in server.cfg.address if isinstance(a, tuple)]
    try:
        errors = startup_errors(args_from_env(), hosts, how="gunicorn -b")
    except ConfigError as e:
        errors = str(e).splitlines()
    if errors:
        server.halt(reason="LightTTS: " + " | ".join(errors), exit_status=2)
