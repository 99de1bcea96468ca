"""ServerArgs, the one declaration of the server's flags: the parser, the checks and the environment
mapping all come from it, and no script, wrapper or env file keeps a copy of a default."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from light_tts.server import args as sa
from light_tts.server.args import (ALIASES, FIELDS, ConfigError, ServerArgs, args_from_env, build_parser,
                                   default_of, env_argv, env_names, parse_args, validate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# limits small enough that every sample below is a valid combination
BASE = {"max_total_token_num": "8192", "max_req_total_len": "2048", "batch_max_tokens": "2048"}

# flag -> (environment value, command-line arguments): a value other than the default for every flag
SAMPLES = {
    "model_dir": (None, None),   # filled per test: a directory that exists
    "host": ("0.0.0.0", ["0.0.0.0"]),
    "port": ("9123", ["9123"]),
    "httpserver_workers": ("3", ["3"]),
    "zmq_mode": ("ipc:///tmp/elsewhere/", ["ipc:///tmp/elsewhere/"]),
    "api_key": ("s3cret", ["s3cret"]),
    "allow_open": ("true", []),
    "cors_origins": ("https://a.example,http://localhost:3000", ["https://a.example,http://localhost:3000"]),
    "default_format": ("PCM", ["pcm"]),
    "max_upload_bytes": ("1000", ["1000"]),
    "request_timeout": ("30", ["30"]),
    "max_queue_size": ("1", ["1"]),
    "health_monitor": ("true", []),
    "log_stats_interval": ("2.5", ["2.5"]),
    "disable_log_stats": ("yes", ["True"]),
    "log_level": ("DEBUG", ["debug"]),
    "gpu_memory_limit_gb": ("22", ["22"]),
    "encode_process_num": ("2", ["2"]),
    "encode_paral_num": ("5", ["5"]),
    "cache_capacity": ("7", ["7"]),
    "voice_dir": (None, None),   # a directory it creates: test_voice_dir_is_created_private_and_checked
    "max_voices": ("5", ["5"]),
    "voice_quota": ("3", ["3"]),
    "tokenizer_mode": ("fast", ["fast"]),
    "trust_remote_code": ("1", ["true"]),
    "min_prompt_seconds": ("1", ["1"]),
    "max_prompt_seconds": ("20", ["20"]),
    "max_total_token_num": ("4096", ["4096"]),
    "max_req_total_len": ("1024", ["1024"]),
    "bistream_max_len": ("600", ["600"]),
    "batch_max_tokens": ("4096", ["4096"]),
    "running_max_req_size": ("10", ["10"]),
    "router_token_ratio": ("0.5", ["0.5"]),
    "router_max_new_token_len": ("100", ["100"]),
    "router_max_wait_tokens": ("4", ["4"]),
    "cache_reserved_ratio": ("0.25", ["0.25"]),
    "gpt_paral_num": ("12", ["12"]),
    "gpt_paral_step_num": ("200", ["200"]),
    "mode": ("triton_int8kv,triton_flashdecoding", ["triton_int8kv", "triton_flashdecoding"]),
    "disable_cudagraph": ("on", []),
    "graph_max_batch_size": ("4", ["4"]),
    "graph_max_len_in_batch": ("1024", ["1024"]),
    "sample_close": ("True", ["True"]),
    "load_way": ("other", ["other"]),
    "tp_size": (None, None),     # only the default is accepted (test_tp_size_through_the_environment)
    "decode_process_num": ("2", ["2"]),
    "decode_paral_num": ("3", ["3"]),
    "decode_max_batch_size": ("4", ["4"]),
    "data_type": ("bfloat16", ["bfloat16"]),
    "load_trt": ("true", []),
    "load_jit": ("true", ["yes"]),
    "disable_fused_estimator": ("true", ["1"]),
    "decode_prompt_cache_gb": ("1.5", ["1.5"]),
    "decode_stream_cache": ("true", ["1"]),
    "decode_first_hop": ("10", ["10"]),
    "first_hop_tokens": ("10", ["10"]),
    "decode_sm_percent": ("70", ["70"]),
    "first_chunk_priority": ("false", ["false"]),
}


def base_env(model_dir, **extra):
    env = {k.upper(): v for k, v in BASE.items()}
    env["MODEL_DIR"] = str(model_dir)
    env.update(extra)
    return env


def base_argv(model_dir):
    return ["--model_dir", str(model_dir)] + [a for k, v in BASE.items() for a in (f"--{k}", v)]


def test_parser_has_every_field_with_its_default():
    actions = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    assert set(actions) == set(FIELDS) and len(FIELDS) == len(SAMPLES) and set(SAMPLES) == set(FIELDS)
    for name, action in actions.items():
        assert action.option_strings == [f"--{name}"]
        if name == "model_dir":
            assert action.required
        else:
            assert action.default == default_of(name), name
            assert action.help, f"--{name} has no help"


def test_defaults_parse_to_the_dataclass_defaults(tmp_path):
    args = parse_args(["--model_dir", str(tmp_path)], environ={})
    assert isinstance(args, ServerArgs)
    for name in FIELDS:
        if name not in ("model_dir", "data_type"):
            assert getattr(args, name) == default_of(name), name
    assert args.data_type == "fp16" and args.mode == [] and args.api_key is None


@pytest.mark.parametrize("name", sorted(set(SAMPLES) - {"model_dir", "tp_size", "voice_dir"}))
def test_every_flag_is_settable_by_its_environment_variable(name, tmp_path):
    env_value, cli = SAMPLES[name]
    default = parse_args(base_argv(tmp_path), environ={})
    from_env = args_from_env(base_env(tmp_path, **{env_names(name)[0]: env_value}))
    from_cli = parse_args(base_argv(tmp_path) + [f"--{name}", *cli], environ={})
    assert from_env == from_cli
    if FIELDS[name].metadata["secret"]:   # kept off the command line the scripts build
        assert env_value not in env_argv(base_env(tmp_path, **{env_names(name)[0]: env_value}))
    target = ALIASES.get(name, name)
    assert getattr(from_env, name) != getattr(default, name) or getattr(from_env, target) != getattr(default, target)


def test_model_dir_from_the_environment(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    env = base_env(tmp_path)
    assert args_from_env(env).model_dir == str(tmp_path)
    del env["MODEL_DIR"]
    # seed 000's .envrc variable, then the repository's pretrained_models/
    assert args_from_env({**env, "FINETURED_COSYVOICE2_MODEL_PATH": str(other)}).model_dir == str(other)
    empty = {**env, "MODEL_DIR": "", "FINETURED_COSYVOICE2_MODEL_PATH": str(other)}
    assert args_from_env(empty).model_dir == str(other)
    assert env_argv({})[:2] == ["--model_dir", os.path.join(ROOT, "pretrained_models", "CosyVoice2-0.5B")]


def test_tp_size_through_the_environment(tmp_path):
    assert args_from_env(base_env(tmp_path, TP_SIZE="1")).tp_size == 1
    with pytest.raises(ConfigError, match=r"--tp_size 2: only 1 is supported"):
        args_from_env(base_env(tmp_path, TP_SIZE="2"))


def test_environment_spellings(tmp_path):
    env = base_env(tmp_path)
    # empty is unset: the default applies (an env file's `KEY=`)
    assert args_from_env({**env, "REQUEST_TIMEOUT": "", "LOAD_TRT": " "}) == args_from_env(env)
    for spelling, value in (("true", True), ("True", True), ("1", True), ("yes", True), ("false", False),
                            ("False", False), ("0", False), ("off", False)):
        assert args_from_env({**env, "LOAD_TRT": spelling}).load_trt is value
    assert args_from_env({**env, "MODE": "triton_int8kv  ppl_int8kv"}).mode == ["triton_int8kv", "ppl_int8kv"]
    assert args_from_env({**env, "DATA_TYPE": "bf16"}).data_type == "bf16"
    # EXTRA_ARGS: flags as on a command line, after the variables, so they win
    args = args_from_env({**env, "CACHE_CAPACITY": "5", "EXTRA_ARGS": "--cache_capacity 9 --sample_close"})
    assert args.cache_capacity == 9 and args.sample_close is True
    # a value at the start of which argparse would see a flag still arrives as a value
    assert "--decode_first_hop=-1" in env_argv({**env, "DECODE_FIRST_HOP": "-1"})


@pytest.mark.parametrize("var, value, message", [
    ("LOAD_TRT", "maybe", "LOAD_TRT='maybe': expected true or false"),
    ("REQUEST_TIMEOUT", "soon", "REQUEST_TIMEOUT='soon': could not convert"),
    ("PORT", "80.5", "PORT='80.5': invalid literal"),
    ("DATA_TYPE", "int4", "DATA_TYPE='int4': choose from float16"),
    ("GPU_MEMORY_LIMIT_GB", "-1", "GPU_MEMORY_LIMIT_GB='-1': must be a number of GB >= 0"),
    ("LOG_LEVEL", "loud", "LOG_LEVEL='loud': choose from debug"),
])
def test_environment_errors_name_the_variable(tmp_path, var, value, message):
    with pytest.raises(ConfigError) as e:
        args_from_env(base_env(tmp_path, **{var: value}))
    assert message in str(e.value)


def test_validation_one_line_per_mistake(tmp_path):
    argv = ["--model_dir", str(tmp_path / "missing"), "--max_total_token_num", "1000", "--max_req_total_len", "2000",
            "--batch_max_tokens", "1500", "--port", "0", "--httpserver_workers", "65", "--router_token_ratio", "1",
            "--cache_reserved_ratio", "-0.1", "--decode_first_hop", "3", "--zmq_mode", "tcp://x", "--mode",
            "triton_int8kv,fast", "--request_timeout", "0", "--max_queue_size", "0", "--min_prompt_seconds", "5",
            "--max_prompt_seconds", "4", "--cache_capacity", "-1"]
    args = sa.normalize(ServerArgs(**vars(build_parser().parse_args(argv))))
    assert sorted(validate(args)) == sorted([
        f"--model_dir {tmp_path / 'missing'}: not a directory",
        "--batch_max_tokens (1500) must be >= --max_req_total_len (2000): a request's prompt must fit one prefill",
        "--max_req_total_len (2000) must be <= --max_total_token_num (1000): one request must fit the KV cache",
        "--port must be in 1..65535 (got 0)",
        "--httpserver_workers must be <= 64 (got 65); for more, run several instances behind nginx",
        "--router_token_ratio must be in [0, 1) (got 1.0)",
        "--cache_reserved_ratio must be in [0, 1) (got -0.1)",
        "--decode_first_hop must be 0 (official) or >= 5 (got 3): HiFT holds back the last 8 mel frames "
        "(4 tokens) of every chunk",
        "--zmq_mode tcp://x: only ipc:// is supported",
        "--mode fast: unknown; choose from triton_flashdecoding, triton_int8kv, ppl_int8kv, "
        "triton_gqa_flashdecoding, triton_gqa_attention",
        "--request_timeout must be > 0 (got 0.0)",
        "--max_queue_size must be >= 1 (got 0)",
        "--max_prompt_seconds (4.0) must be > --min_prompt_seconds (5.0)",
        "--cache_capacity must be >= 0 (got -1)",
    ])


def test_command_line_refusals_exit_2_with_every_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--model_dir", str(tmp_path), "--batch_max_tokens", "10", "--tp_size", "2"], environ={})
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --tp_size 2: only 1 is supported\n" in err
    assert "error: --batch_max_tokens (10) must be >= --max_req_total_len (16384)" in err


def test_seed_spellings_still_parse(tmp_path):
    d = str(tmp_path)
    # seed 000 / 001 / 002 command lines
    a = parse_args(["--model_dir", d, "--load_trt", "True", "--health_monitor", "--cache_capacity", "100",
                    "--mode", "triton_flashdecoding,triton_int8kv", "--data_type", "bfloat16", "--gpt_paral_num",
                    "150", "--gpt_paral_step_num", "300", "--decode_paral_num", "2", "--trust_remote_code", "False",
                    "--disable_log_stats", "False", "--sample_close", "False", "--load_jit", "False",
                    "--disable_cudagraph", "False", "--cache_reserved_ratio", "0.5", "--tokenizer_mode", "slow",
                    "--load_way", "HF", "--zmq_mode", "ipc:///tmp/"], environ={})
    assert a.load_trt and a.health_monitor and a.mode == ["triton_flashdecoding", "triton_int8kv"]
    assert a.data_type == "bf16" and a.running_max_req_size == 150 and a.decode_max_batch_size == 2
    assert parse_args(["--model_dir", d, "--mode", "ppl_int8kv"], environ={}).mode == ["ppl_int8kv"]
    assert parse_args(["--model_dir", d, "--load_trt"], environ={}).load_trt is True
    assert parse_args(["--model_dir", d, "--first_hop_tokens", "12"], environ={}).decode_first_hop == 12


def test_api_key_stays_off_command_lines_and_help(tmp_path, capsys):
    env = base_env(tmp_path, LIGHTTTS_API_KEY="hunter2")
    assert "hunter2" not in env_argv(env) and args_from_env(env).api_key == "hunter2"
    assert parse_args(["--model_dir", str(tmp_path)], environ={"LIGHTTTS_API_KEY": "k"}).api_key == "k"
    given = parse_args(["--model_dir", str(tmp_path), "--api_key", "x"], environ={"LIGHTTTS_API_KEY": "k"})
    assert given.api_key == "x"
    os.environ["LIGHTTTS_API_KEY"] = "hunter2"
    try:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--help"])
    finally:
        del os.environ["LIGHTTTS_API_KEY"]
    assert "hunter2" not in capsys.readouterr().out


def test_the_args_survive_json_and_pickle(tmp_path):
    import json
    import pickle
    args = args_from_env(base_env(tmp_path, MODE="triton_int8kv", LIGHTTTS_API_KEY="k"))
    assert ServerArgs(**json.loads(json.dumps(vars(args)))) == args   # api_server / backend hand-over
    assert pickle.loads(pickle.dumps(args)) == args                    # spawn'd stage processes


def test_every_flag_acts_or_says_it_has_no_effect():
    sources = []
    for d, _, files in os.walk(os.path.join(ROOT, "light_tts")):
        sources += [open(os.path.join(d, f)).read() for f in files if f.endswith(".py") and f != "args.py"]
    code = "\n".join(sources)
    for name, f in FIELDS.items():
        read = re.search(rf"args\.{name}\b|getattr\((self\.)?args, \"{name}\"", code) or name in ALIASES
        if not read:
            assert "no effect here: " in f.metadata["help"], f"--{name} is read nowhere and its help does not say so"
    # --mode: which values act and which do not
    help_text = FIELDS["mode"].metadata["help"]
    for m in sa.MODES:
        assert m in help_text
    assert "no effect here" in help_text and all(m in code for m in sa.INT8_KV_MODES)


SCRIPTS = ["scripts/start_lighttts_a10.sh", "scripts/run.sh", "scripts/deploy.sh", "scripts/lighttts_common.sh"]


# Deliberate deployment defaults that differ from the server's own: the start scripts give every
# instance of a deployment one shared voice store; a server started alone keeps its voices private.
DEPLOYMENT_DEFAULTS = {"VOICE_DIR"}


def test_no_default_is_kept_outside_server_args():
    names = {e for n in FIELDS for e in env_names(n)} - DEPLOYMENT_DEFAULTS
    for path in SCRIPTS:
        for i, line in enumerate(open(os.path.join(ROOT, path)), 1):
            for m in re.finditer(r"\$\{(\w+):?[-=]", line):
                assert m.group(1) not in names, f"{path}:{i}: a default for server flag {m.group(1)}: {line.strip()}"
    wrapper = open(os.path.join(ROOT, "wsgi_wrapper.py")).read()
    for name in FIELDS:   # no CONFIG-style key list of its own
        assert f'"{name}"' not in wrapper and f"'{name}'" not in wrapper, name


def read_env_file(path):
    out = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v.strip('"')
    return out


def test_env_files_set_only_what_differs(tmp_path):
    """Each server key of a profile changes what the server gets: single's over the defaults, multi's
    over single's (it is read on top of a10_single.env)."""
    single = read_env_file(os.path.join(ROOT, "configs", "a10_single.env"))
    multi = read_env_file(os.path.join(ROOT, "configs", "a10_multi.env"))
    names = {e for n in FIELDS for e in env_names(n)}

    def resolved(env):   # parsed, not validated: one of a pair of limits alone may not be a valid combination
        return build_parser().parse_args(env_argv({**{k: v for k, v in env.items() if k in names},
                                                   "MODEL_DIR": str(tmp_path)}))
    for layer, below in ((single, {}), (multi, single)):
        for key, value in layer.items():
            if key in names and value:
                without = {**below, **{k: v for k, v in layer.items() if k != key}}
                assert resolved({**without, key: value}) != resolved(without), \
                    f"{key}={value} repeats what applies without it"


def test_the_command_the_scripts_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {e for n in FIELDS for e in env_names(n)}}
    env.update(PYTHONPATH=ROOT, MODEL_DIR=str(tmp_path), REQUEST_TIMEOUT="30", LOAD_TRT="true",
               MODE="triton_int8kv ppl_int8kv", EXTRA_ARGS="--log_level debug")
    run = lambda *a: subprocess.run([sys.executable, "-m", "light_tts.server.args", *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    r = run("--from-env")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["--model_dir", str(tmp_path), "--request_timeout", "30", "--mode", "triton_int8kv",
                                     "ppl_int8kv", "--load_trt", "True", "--log_level", "debug"]
    r = run("--from-env", "--get", "request_timeout", "port", "mode", "api_key", "load_trt")
    assert r.stdout.splitlines() == ["30.0", "8080", "triton_int8kv ppl_int8kv", "", "True"], r.stdout
    env["PORT"] = "http"
    r = run("--from-env")
    assert r.returncode == 2 and "PORT='http'" in r.stderr, r.stderr
    r = run("--list")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == len(FIELDS)
    assert re.search(r"^--request_timeout\s+REQUEST_TIMEOUT\s+300.0$", r.stdout, re.M), r.stdout


def test_dataclass_fields_carry_their_declaration():
    for f in dataclasses.fields(ServerArgs):
        assert f.metadata["group"] in ("server", "encode", "LLM", "decode"), f.name


def test_a_cosyvoice3_directory_is_accepted(tmp_path):
    """The server serves CosyVoice3 too (each stage loads the directory's family): no refusal at parse time."""
    (tmp_path / "cosyvoice3.yaml").write_text("sample_rate: 24000\n")
    assert parse_args(["--model_dir", str(tmp_path)], environ={}).model_dir == str(tmp_path)


def test_a_port_in_use_stops_the_start_before_any_stage(tmp_path):
    """Another server on the port: one line and exit 2 at once, not after every stage has loaded."""
    import socket
    (tmp_path / "cosyvoice2.yaml").write_text("sample_rate: 24000\n")
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "light_tts.server.api_server", "--model_dir", str(tmp_path),
                            "--host", "127.0.0.1", "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"error: --port {port}: cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "starting" not in r.stderr   # the backend never started a stage


def test_voice_dir_is_created_private_and_checked(tmp_path):
    voices = tmp_path / "deploy" / "voices"
    env = base_env(tmp_path, VOICE_DIR=str(voices))
    args = args_from_env(env)
    assert args == parse_args(base_argv(tmp_path) + ["--voice_dir", str(voices)], environ={})
    assert args.voice_dir == str(voices) and oct(os.stat(voices).st_mode & 0o777) == "0o700"
    assert args_from_env(base_env(tmp_path, VOICE_DIR="")).voice_dir is None   # VOICE_DIR= : the private default
    os.chmod(voices, 0o777)
    with pytest.raises(ConfigError, match=r"--voice_dir .*voices is world-writable \(mode 0777\).*chmod o-w"):
        args_from_env(env)
    os.chmod(voices, 0o700)
    (tmp_path / "file").write_text("x")
    assert any("--voice_dir" in e and "not a directory" in e
               for e in validate(parse_args(base_argv(tmp_path), environ={}).__class__(
                   **{**dataclasses.asdict(parse_args(base_argv(tmp_path), environ={})),
                      "voice_dir": str(tmp_path / "file")})))


def test_api_key_lists_and_the_voice_quota(tmp_path):
    from light_tts.server.args import api_keys
    from light_tts.server.encode.voice_store import key_quota as voice_quota
    one = parse_args(base_argv(tmp_path), environ={"LIGHTTTS_API_KEY": "k1"})
    three = parse_args(base_argv(tmp_path) + ["--max_voices", "10"], environ={"LIGHTTTS_API_KEY": " k1, k2 ,k3,"})
    assert api_keys(three.api_key) == ["k1", "k2", "k3"]
    assert voice_quota(one) == 0 and voice_quota(three) == 4      # a fair share: 10 / 3 rounded up
    assert voice_quota(parse_args(base_argv(tmp_path) + ["--voice_quota", "2"], environ={"LIGHTTTS_API_KEY": "a,b"})) == 2
    with pytest.raises(ConfigError, match="holds no key"):
        args_from_env(base_env(tmp_path, LIGHTTTS_API_KEY=" , "))


def test_every_flag_has_help_text():
    """`--help` explains every flag (four had none): a non-empty help for each, and the text renders."""
    parser = build_parser()
    missing = [a.dest for a in parser._actions if a.dest != "help" and not (a.help or "").strip()]
    assert not missing, missing
    text = parser.format_help()
    assert all(f"--{name}" in text for name in FIELDS)


# ---- start-up checks: --load_trt on this machine, and a listening address open without a key

def test_load_trt_needs_a_gpu_and_tensorrt_and_says_so(tmp_path, monkeypatch):
    from light_tts.server import api_server
    args = parse_args(base_argv(tmp_path) + ["--load_trt"], environ={})
    monkeypatch.setattr(api_server, "nvidia_gpu_present", lambda: False)
    (line,) = api_server.startup_errors(args)
    assert line.startswith("--load_trt True needs an NVIDIA GPU") and "--load_trt False" in line
    assert "not verified" in line   # honest: TensorRT never ran in this project's tests
    monkeypatch.setattr(api_server, "nvidia_gpu_present", lambda: True)
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorrt" else real_find_spec(n, *a))
    (line,) = api_server.startup_errors(args)
    assert "tensorrt package, which is not installed" in line and "--load_trt False" in line
    assert "pip install tensorrt-cu12" in line and "not verified" in line
    assert api_server.startup_errors(parse_args(base_argv(tmp_path), environ={})) == []


def test_an_address_open_to_other_machines_needs_a_key_or_allow_open(tmp_path):
    from light_tts.server import api_server

    def errors(*extra, key=None):
        return api_server.startup_errors(parse_args(base_argv(tmp_path) + list(extra),
                                            environ={"LIGHTTTS_API_KEY": key} if key else {}))
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert errors("--host", host) == [], host
    for host in ("0.0.0.0", "::", "192.168.1.5", "tts.example.com"):
        (line,) = errors("--host", host)
        assert line.startswith(f"--host {host} serves other machines without an API key"), line
        assert "LIGHTTTS_API_KEY" in line and "Authorization: Bearer" in line and "--allow_open" in line
        assert errors("--host", host, key="k") == []
        assert errors("--host", host, "--allow_open") == []
    # gunicorn: its -b addresses are checked instead of --host
    args = parse_args(base_argv(tmp_path), environ={})
    assert "gunicorn -b 0.0.0.0 serves" in api_server.startup_errors(args, ["127.0.0.1", "0.0.0.0"], how="gunicorn -b")[0]
    assert args_from_env(base_env(tmp_path, ALLOW_OPEN="true")).allow_open is True


def _child_cpu_seconds() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@pytest.mark.parametrize("flags, env, expect", [
    (["--load_trt", "True"], {}, "--load_trt True needs "),
    (["--host", "0.0.0.0"], {}, "--host 0.0.0.0 serves other machines without an API key"),
])
def test_api_server_refuses_at_once_what_this_machine_or_address_cannot_serve(tmp_path, flags, env, expect):
    """One line and exit 2 in well under a second of work, before any stage: --load_trt without
    an NVIDIA GPU or TensorRT (it failed after 7-15 s of loading, suggesting to install TensorRT), an
    exposed --host without a key."""
    from light_tts.server import api_server
    if "--load_trt" in flags and api_server._load_trt_error(parse_args(base_argv(tmp_path) + flags, environ={})) is None:
        pytest.skip("this machine has a GPU and TensorRT")
    (tmp_path / "cosyvoice2.yaml").write_text("sample_rate: 24000\n")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cpu0 = _child_cpu_seconds()
    r = subprocess.run([sys.executable, "-m", "light_tts.server.api_server", "--model_dir", str(tmp_path),
                        "--port", str(port), *flags], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in {**os.environ, **env}.items() if k != "LIGHTTTS_API_KEY"})
    cpu = _child_cpu_seconds() - cpu0
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expect}"), r.stderr
    assert "Traceback" not in r.stderr and "starting" not in r.stderr
    assert cpu < 1.5, f"{cpu:.2f} s of CPU before refusing"   # wall time on a loaded 2-core box says less
