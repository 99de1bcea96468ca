"""--decode_sm_percent: the MPS share reaches the decode process's environment, and says when it cannot work."""
import os

from light_tts.server.args import parse_args, validate, ServerArgs
from light_tts.server.mps import PERCENT_ENV, limit_sms, mps_running


def test_no_daemon_sets_the_share_and_warns(tmp_path):
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    why = limit_sms(60, env)
    assert env[PERCENT_ENV] == "60"
    assert why is not None and "no effect" in why and str(tmp_path) in why


def test_daemon_pipe_found(tmp_path):
    (tmp_path / "control").write_text("")   # where nvidia-cuda-mps-control -d puts its pipe
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    assert mps_running(env)
    assert limit_sms(70, env) is None and env[PERCENT_ENV] == "70"


def test_zero_changes_nothing(tmp_path):
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    assert limit_sms(0, env) is None and PERCENT_ENV not in env


def test_flag_range(tmp_path):
    model = str(tmp_path)
    assert parse_args(["--model_dir", model, "--decode_sm_percent", "70"], environ={}).decode_sm_percent == 70
    errors = validate(ServerArgs(model_dir=model, decode_sm_percent=101))
    assert any(e.startswith("--decode_sm_percent must be a percentage") for e in errors)
