"""PretrainedModel.from_pretrained and the family entry point (load_model, model_family), for every model
family: the generated directory, round trip, strict keys, clear errors, generator determinism."""
import os
import shutil

import pytest
import torch

from light_tts.models.cosyvoice2 import CosyVoice2Model
from light_tts.models.loading import ModelLoadError
from light_tts.models.pretrained import FAMILIES, load_model, model_class, model_family
from light_tts.tools.make_random_model import make_random_model, official_yaml_text
from model_util import legacy_hift_state_dict

S = 6561
QUIET = lambda *a, **k: None  # noqa: E731
LAYOUT = {
    "cosyvoice2": ["cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx",
                   "CosyVoice-BlankEN/config.json", "CosyVoice-BlankEN/model.safetensors"],
    "cosyvoice3": ["cosyvoice3.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v3.onnx",
                   "CosyVoice-BlankEN/config.json", "CosyVoice-BlankEN/model.safetensors",
                   "CosyVoice-BlankEN/vocab.json", "CosyVoice-BlankEN/merges.txt",
                   "CosyVoice-BlankEN/tokenizer_config.json"],
}
CLASSES = {  # the model class and its llm, flow, hift
    "cosyvoice2": ("CosyVoice2Model", "Qwen2LM", "CausalMaskedDiffWithXvec", "HiFTGenerator"),
    "cosyvoice3": ("CosyVoice3Model", "CosyVoice3LM", "CausalMaskedDiffWithDiT", "CausalHiFTGenerator"),
}


def _copy(src, tmp_path):
    dst = str(tmp_path / "model")
    shutil.copytree(src, dst)
    return dst


def test_layout_is_official(family_dir):
    family, d = family_dir
    for name in LAYOUT[family]:
        assert os.path.isfile(os.path.join(d, name)), name
    other = next(f for f in FAMILIES.values() if f.name != family)
    assert not os.path.exists(os.path.join(d, other.yaml))
    assert not os.path.exists(os.path.join(d, other.speech_tokenizer))


def test_load_model_picks_the_family_and_loads_every_weight(family_dir):
    family, d = family_dir
    assert model_family(d) == family
    model = load_model(d)
    assert tuple(type(m).__name__ for m in (model, model.llm, model.flow, model.hift)) == CLASSES[family]
    for name in ("llm", "flow", "hift"):
        on_disk = torch.load(os.path.join(d, f"{name}.pt"), weights_only=True)
        loaded = getattr(model, name).state_dict()
        assert set(on_disk) == set(loaded), name
        for k, v in on_disk.items():
            assert torch.equal(v, loaded[k]), f"{name}: {k}"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype_and_components(family_dir, dtype):
    family, d = family_dir
    model = model_class(family).from_pretrained(d, dtype=dtype, components=("llm", "hift"))
    assert model.flow is None
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert all(p.dtype == want for p in model.llm.parameters())
    for n, p in model.hift.named_parameters():
        # the CosyVoice3 F0 predictor keeps fp64 weights by design (light_tts.models.hift_causal)
        assert p.dtype == (torch.float64 if family == "cosyvoice3" and n.startswith("f0_predictor.") else want), n


# (family, the removed file, what the error says besides "<file> is missing")
MISSING = [
    ("cosyvoice2", "flow.pt", ["flow-matching", "llm.pt"]),
    ("cosyvoice3", "hift.pt", ["(the causal HiFT vocoder weights)", "A CosyVoice3 model directory holds cosyvoice3.yaml",
                               "speech_tokenizer_v3.onnx", "--family cosyvoice3"]),
]


@pytest.mark.parametrize("family, name, says", MISSING, ids=[m[0] for m in MISSING])
def test_missing_file_says_which_and_what_belongs_there(family, name, says, tiny_dir_of, tmp_path):
    d = _copy(tiny_dir_of(family), tmp_path)
    os.remove(os.path.join(d, name))
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    msg = str(e.value)
    assert f"{name} is missing" in msg and all(s in msg for s in says), msg


def test_not_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        CosyVoice2Model.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(str(tmp_path / "nope"))


def _drop(key):
    return lambda sd: sd.pop(key)


def _narrow(key, rows=None, cols=None):
    def change(sd):
        sd[key] = sd[key][:rows, :cols].clone()
    return change


def _add(key):
    return lambda sd: sd.__setitem__(key, torch.zeros(3))


# (family, component, change to its state dict, the error loading it must raise)
BROKEN = [
    ("cosyvoice2", "llm", _drop("llm_decoder.bias"), r"llm\.pt: missing key 'llm_decoder\.bias'"),
    ("cosyvoice3", "llm", _drop("llm_decoder.weight"), r"llm\.pt: missing key 'llm_decoder\.weight'.*cosyvoice3\.yaml"),
    ("cosyvoice2", "flow", _add("encoder.not_a_layer.weight"), r"flow\.pt: unexpected key 'encoder\.not_a_layer\.weight'"),
    ("cosyvoice2", "llm", _narrow("speech_embedding.weight", cols=10),
     r"(?s)'speech_embedding\.weight' has shape \(6564, 10\) in the file.*expects \(6564, 64\)"),
    ("cosyvoice3", "llm", _narrow("speech_embedding.weight", rows=S + 3),  # a CosyVoice2-sized table
     r"'speech_embedding\.weight' has shape \(6564, 64\) in the file, the configuration expects \(6761, 64\)"),
]


@pytest.mark.parametrize("family, component, change, error", BROKEN,
                         ids=["cv2-missing", "cv3-missing", "cv2-unexpected", "cv2-shape", "cv3-shape"])
def test_a_wrong_key_is_named(family, component, change, error, tiny_dir_of, tmp_path):
    d = _copy(tiny_dir_of(family), tmp_path)
    path = os.path.join(d, f"{component}.pt")
    sd = torch.load(path, weights_only=True)
    change(sd)
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match=error):
        load_model(d, components=(component,))


@pytest.mark.parametrize("family, component", [("cosyvoice2", "flow"), ("cosyvoice3", "hift")])
def test_full_yaml_beside_tiny_weights_names_the_key(family, component, tiny_dir_of, tmp_path):
    d = _copy(tiny_dir_of(family), tmp_path)
    with open(os.path.join(d, FAMILIES[family].yaml), "w") as f:
        f.write(official_yaml_text(family))
    with pytest.raises(ModelLoadError, match=rf"{component}\.pt: .*key '"):
        load_model(d, components=(component,))


def test_not_a_state_dict(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    with open(os.path.join(d, "hift.pt"), "wb") as f:
        f.write(b"this is not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"hift\.pt: cannot read"):
        CosyVoice2Model.from_pretrained(d, components=("hift",))


def test_legacy_hift_keys_load(family_dir, tmp_path):
    # official hift.pt files may carry a 'generator.' prefix and old weight_g/weight_v names
    family, d = family_dir
    d = _copy(d, tmp_path)
    path = os.path.join(d, "hift.pt")
    sd = torch.load(path, weights_only=True)
    torch.save(legacy_hift_state_dict(sd), path)
    model = load_model(d, components=("hift",))
    for k, v in model.hift.state_dict().items():
        assert torch.equal(v, sd[k])


# ---- families side by side ------------------------------------------------------------------------

def test_family_is_read_from_the_yaml(tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    (both / "cosyvoice3.yaml").write_text("")
    (both / "cosyvoice2.yaml").write_text("")
    assert model_family(str(both)) == "cosyvoice2"  # the official AutoModel's order


def test_no_family_says_what_a_directory_holds(tmp_path):
    (tmp_path / "llm.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        model_family(str(tmp_path))
    msg = str(e.value)
    assert "neither cosyvoice2.yaml nor cosyvoice3.yaml" in msg
    assert "speech_tokenizer_v2.onnx" in msg and "speech_tokenizer_v3.onnx" in msg
    assert "holds: llm.pt" in msg
    (tmp_path / "cosyvoice.yaml").write_text("")
    with pytest.raises(ModelLoadError, match="CosyVoice 1 models are not supported"):
        model_family(str(tmp_path))


def test_a_family_class_refuses_the_other_family(tiny_cv3_model_dir):
    with pytest.raises(ModelLoadError, match=r"cosyvoice2\.yaml is missing"):
        CosyVoice2Model.from_pretrained(tiny_cv3_model_dir)


def test_a_cosyvoice2_lm_in_a_cosyvoice3_directory_is_named(tiny_cv3_model_dir, tiny_model_dir, tmp_path):
    d = _copy(tiny_cv3_model_dir, tmp_path)
    shutil.copy(os.path.join(tiny_model_dir, "llm.pt"), os.path.join(d, "llm.pt"))
    with pytest.raises(ModelLoadError, match=r"llm\.pt: unexpected key 'llm_embedding\.weight'"):
        load_model(d, components=("llm",))


def test_stop_ids_of_the_cosyvoice2_lm(tiny_model_dir):
    assert load_model(tiny_model_dir, components=("llm",)).llm.stop_token_ids == range(S, S + 3)


# ---- the generator ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generator_is_deterministic(family, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        make_random_model(str(tmp_path / name), "tiny", seed=seed, log=QUIET, family=family)
    for name in ("llm.pt", "flow.pt", "hift.pt"):
        a, b, c = (torch.load(str(tmp_path / x / name), weights_only=True) for x in "abc")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 16)
    for name in (FAMILIES[family].yaml, "campplus.onnx", FAMILIES[family].speech_tokenizer,
                 "CosyVoice-BlankEN/vocab.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_generator_default_family_is_cosyvoice2(tmp_path):
    from light_tts.tools.make_random_model import main
    assert main(["--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "cosyvoice2.yaml").is_file() and (tmp_path / "d" / "speech_tokenizer_v2.onnx").is_file()
    assert not (tmp_path / "d" / "cosyvoice3.yaml").exists()


def test_generator_cli_family_flag(tmp_path):
    from light_tts.tools.make_random_model import main
    with pytest.raises(SystemExit):
        main(["--family", "cosyvoice1", "--out", str(tmp_path / "x")])
    assert main(["--family", "cosyvoice3", "--out", str(tmp_path / "cv3")]) == 0
    assert model_family(str(tmp_path / "cv3")) == "cosyvoice3"
