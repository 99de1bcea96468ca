"""--model_dir as a ModelScope model id (light_tts.models.hub), as the official CosyVoice takes it: an
existing directory passes as given; an id is downloaded with the `modelscope` extra; without the
extra, or without the hub, one line says how to get the model."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from light_tts.models.hub import ModelLoadError, resolve_model_dir
from light_tts.models.pretrained import load_model
from light_tts.server.api_server import model_name
from light_tts.server.args import parse_args
from light_tts.synthesize import main as synthesize

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PROMPT = ["--prompt_wav", os.path.join(FIXTURES, "prompt_en.wav"), "--prompt_text",
          "The quick brown fox jumps over the lazy dog."]
OFFICIAL_IDS = {"cosyvoice2": "iic/CosyVoice2-0.5B", "cosyvoice3": "FunAudioLLM/Fun-CosyVoice3-0.5B-2512"}
# Ids no hub holds: a machine that reaches the hub gets "no such model", never a 1 GB download
MISSING_ID = "lighttts-tests/no-such-model"


@pytest.fixture
def without_modelscope(monkeypatch):
    """An install without the extra: None in sys.modules makes `import modelscope` raise ImportError."""
    monkeypatch.setitem(sys.modules, "modelscope", None)


def no_extra_line(model_id):
    return (f"{model_id}: not a directory; to download the ModelScope model {model_id}, pip install "
            f"'light-tts[modelscope]' (or where the hub is reachable: modelscope download --model {model_id} "
            f"--local_dir DIR, and use DIR)")


def test_a_path_passes_as_given(tmp_path, monkeypatch):
    assert resolve_model_dir(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    os.makedirs("iic/CosyVoice2-0.5B")    # a local directory wins over the id of the same spelling
    assert resolve_model_dir("iic/CosyVoice2-0.5B") == "iic/CosyVoice2-0.5B"
    (tmp_path / "file").write_text("")
    for path in ("missing", "a/b/c", "./x/y", "/abs/x", "file"):   # no id: for the caller to refuse
        assert resolve_model_dir(path) == path


def test_what_is_neither_a_directory_nor_an_id_is_not_a_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for bad in (str(tmp_path / "missing"), str(tmp_path / "file"), "missing", "a/b/c"):
        with pytest.raises(SystemExit) as e:
            parse_args(["--model_dir", bad], environ={})
        assert e.value.code == 2 and capsys.readouterr().err == f"error: --model_dir {bad}: not a directory\n"
        with pytest.raises(ModelLoadError, match=re.escape(f"{bad} is not a directory")):
            load_model(bad)


@pytest.mark.parametrize("family", sorted(OFFICIAL_IDS))
def test_an_id_without_the_extra_says_how_to_get_it(family, without_modelscope):
    with pytest.raises(ModelLoadError) as e:
        resolve_model_dir(OFFICIAL_IDS[family])
    assert str(e.value) == no_extra_line(OFFICIAL_IDS[family])


def test_the_server_refuses_an_id_without_the_extra_with_one_line(without_modelscope, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--model_dir", OFFICIAL_IDS["cosyvoice2"]], environ={})
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: --model_dir {no_extra_line(OFFICIAL_IDS['cosyvoice2'])}\n"


@pytest.mark.parametrize("family", sorted(OFFICIAL_IDS))
def test_synthesize_refuses_an_id_without_the_extra_with_one_line(family, without_modelscope, tmp_path, capsys):
    rc = synthesize(["--model_dir", OFFICIAL_IDS[family], *PROMPT, "--tts_text", "Hi.", "--out",
                     str(tmp_path / "out.wav")])
    assert rc == 2 and capsys.readouterr().err == f"error: {no_extra_line(OFFICIAL_IDS[family])}\n"


def test_a_hub_cache_copy_is_named_by_its_model():
    assert model_name("/c/models/iic--CosyVoice2-0.5B/snapshots/master") == "CosyVoice2-0.5B"
    assert model_name("models/tiny/") == "tiny"


# With modelscope: the hub is an address where nothing listens, and the cache a fresh directory.
def offline_env(cache_dir):
    return {**os.environ, "MODELSCOPE_CACHE": str(cache_dir), "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9",
            "MODELSCOPE_DOMAIN": "127.0.0.1:9",
            # fewer retries (modelscope >= 1.38 reads these; older versions retry longer)
            "MODELSCOPE_API_MAX_RETRIES": "1", "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1"}


def run(args, env):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_an_unreachable_hub_gives_one_line_with_the_reason(tmp_path):
    pytest.importorskip("modelscope")
    r = run(["-m", "light_tts.server.api_server", "--model_dir", MISSING_ID], offline_env(tmp_path))
    assert r.returncode == 2, r.stderr
    line = r.stderr.splitlines()[-1]
    assert line.startswith(f"error: --model_dir {MISSING_ID}: not a directory, and downloading it from ModelScope "
                           "failed ("), r.stderr
    assert line.endswith(f"); download it where the hub is reachable: modelscope download --model {MISSING_ID} "
                         "--local_dir DIR, and use DIR"), r.stderr


def test_an_id_the_cache_holds_synthesises_without_the_hub(family_dir, tmp_path):
    """modelscope >= 1.38 keeps a download in <MODELSCOPE_CACHE>/models/<owner>--<name>/snapshots/master
    and finds it there with local_files_only; that copy is what an unreachable hub leaves us."""
    pytest.importorskip("modelscope", minversion="1.38")
    family, tiny = family_dir
    owner, name = "lighttts-tests", f"tiny-{family}"
    snapshot = tmp_path / "cache" / "models" / f"{owner}--{name}" / "snapshots" / "master"
    shutil.copytree(tiny, snapshot)
    out = tmp_path / "out.wav"
    r = run(["-m", "light_tts.synthesize", "--model_dir", f"{owner}/{name}", *PROMPT, "--tts_text", "Hi.",
             "--out", str(out), "--max_speech_tokens", "10", "--device", "cpu"], offline_env(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert f"{owner}/{name}: ModelScope unreachable (" in r.stderr and f"using the copy in its cache, {snapshot}" \
        in r.stderr, r.stderr
    assert out.stat().st_size > 44
