"""CosyVoice2Model.from_pretrained (and the family entry point on a CosyVoice2 directory): round trip,
strict keys, clear errors, generator determinism."""
import os
import shutil

import pytest
import torch

from light_tts.models.cosyvoice2 import CosyVoice2Model
from light_tts.models.loading import ModelLoadError


def _copy(src, tmp_path):
    dst = str(tmp_path / "model")
    shutil.copytree(src, dst)
    return dst


def test_layout_is_official(tiny_model_dir):
    for name in ["cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx",
                 "CosyVoice-BlankEN/config.json", "CosyVoice-BlankEN/model.safetensors"]:
        assert os.path.isfile(os.path.join(tiny_model_dir, name)), name


def test_round_trip_equals_files(tiny_model_dir):
    model = CosyVoice2Model.from_pretrained(tiny_model_dir)
    for name in ("llm", "flow", "hift"):
        on_disk = torch.load(os.path.join(tiny_model_dir, f"{name}.pt"), weights_only=True)
        loaded = getattr(model, name).state_dict()
        assert set(on_disk) == set(loaded)
        for k, v in on_disk.items():
            assert torch.equal(v, loaded[k]), f"{name}: {k}"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype_and_components(tiny_model_dir, dtype):
    model = CosyVoice2Model.from_pretrained(tiny_model_dir, dtype=dtype, components=("llm",))
    assert model.flow is None and model.hift is None
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert all(p.dtype == want for p in model.llm.parameters())


def test_missing_file_says_which_and_what_belongs_there(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    os.remove(os.path.join(d, "flow.pt"))
    with pytest.raises(ModelLoadError) as e:
        CosyVoice2Model.from_pretrained(d)
    msg = str(e.value)
    assert "flow.pt is missing" in msg and "flow-matching" in msg and "llm.pt" in msg


def test_not_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        CosyVoice2Model.from_pretrained(str(tmp_path / "nope"))


def test_missing_key_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    path = os.path.join(d, "llm.pt")
    sd = torch.load(path, weights_only=True)
    del sd["llm_decoder.bias"]
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match=r"llm\.pt: missing key 'llm_decoder\.bias'"):
        CosyVoice2Model.from_pretrained(d, components=("llm",))


def test_unexpected_key_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    path = os.path.join(d, "flow.pt")
    sd = torch.load(path, weights_only=True)
    sd["encoder.not_a_layer.weight"] = torch.zeros(3)
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match=r"flow\.pt: unexpected key 'encoder\.not_a_layer\.weight'"):
        CosyVoice2Model.from_pretrained(d, components=("flow",))


def test_shape_mismatch_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    path = os.path.join(d, "llm.pt")
    sd = torch.load(path, weights_only=True)
    sd["speech_embedding.weight"] = sd["speech_embedding.weight"][:, :10].clone()
    torch.save(sd, path)
    with pytest.raises(ModelLoadError) as e:
        CosyVoice2Model.from_pretrained(d, components=("llm",))
    assert "'speech_embedding.weight' has shape (6564, 10) in the file" in str(e.value)
    assert "expects (6564, 64)" in str(e.value)


def test_wrong_config_for_weights(tiny_model_dir, tmp_path):
    # a full-size yaml beside tiny weights: the shape error names the file and the key
    from light_tts.tools.make_random_model import official_yaml_text
    d = _copy(tiny_model_dir, tmp_path)
    with open(os.path.join(d, "cosyvoice2.yaml"), "w") as f:
        f.write(official_yaml_text())
    with pytest.raises(ModelLoadError, match=r"flow\.pt: .*key '"):
        CosyVoice2Model.from_pretrained(d, components=("flow",))


def test_not_a_state_dict(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    with open(os.path.join(d, "hift.pt"), "wb") as f:
        f.write(b"this is not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"hift\.pt: cannot read"):
        CosyVoice2Model.from_pretrained(d, components=("hift",))


def test_legacy_hift_keys_load(tiny_model_dir, tmp_path):
    # official hift.pt files may carry a 'generator.' prefix and old weight_g/weight_v names
    d = _copy(tiny_model_dir, tmp_path)
    path = os.path.join(d, "hift.pt")
    sd = torch.load(path, weights_only=True)
    legacy = {}
    for k, v in sd.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v")
        legacy["generator." + k] = v
    torch.save(legacy, path)
    model = CosyVoice2Model.from_pretrained(d, components=("hift",))
    for k, v in model.hift.state_dict().items():
        assert torch.equal(v, sd[k])


def test_generator_is_deterministic(tmp_path):
    from light_tts.tools.make_random_model import make_random_model
    quiet = lambda *a, **k: None
    make_random_model(str(tmp_path / "a"), "tiny", seed=1, log=quiet)
    make_random_model(str(tmp_path / "b"), "tiny", seed=1, log=quiet)
    make_random_model(str(tmp_path / "c"), "tiny", seed=2, log=quiet)
    for name in ("llm.pt", "flow.pt", "hift.pt"):
        a, b, c = (torch.load(str(tmp_path / x / name), weights_only=True) for x in "abc")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 16)
    for name in ("campplus.onnx", "speech_tokenizer_v2.onnx", "CosyVoice-BlankEN/vocab.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_family_entry_point_loads_cosyvoice2(tiny_model_dir):
    from light_tts.models.pretrained import load_model, model_family
    assert model_family(tiny_model_dir) == "cosyvoice2"
    model = load_model(tiny_model_dir, components=("llm",))
    assert type(model) is CosyVoice2Model and model.flow is None
    assert model.llm.stop_token_ids == range(6561, 6564)


def test_generator_default_family_is_cosyvoice2(tmp_path):
    from light_tts.tools.make_random_model import main
    assert main(["--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "cosyvoice2.yaml").is_file() and (tmp_path / "d" / "speech_tokenizer_v2.onnx").is_file()
    assert not (tmp_path / "d" / "cosyvoice3.yaml").exists()
