"""Read the sizes we need from an official `cosyvoice2.yaml` / `cosyvoice3.yaml` without executing it.

The official file is HyperPyYAML: `!new:pkg.Class` builds objects, `!name:` makes
partials, `!apply:` calls functions (seeding RNGs), `!ref <key>` points at other
keys and may hold arithmetic (`<chunk_size> * <token_mel_ratio>`). We parse it with
a safe loader that turns every tagged node into a plain `Node(tag, target, value)`,
resolve `!ref` ourselves (only names, numbers and + - * / //), and never import or
call anything the file names.
"""
from __future__ import annotations

import ast
import json
import operator
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Tuple

import yaml


class ConfigError(ValueError):
    """A model directory's configuration is missing or not what we can load."""


@dataclass
class Node:
    tag: str        # "new", "name", "apply", "ref", ...
    target: str     # "cosyvoice.llm.llm.Qwen2LM" for !new:..., the expression for !ref
    value: Any      # mapping / sequence / scalar under the tag


class _HyperLoader(yaml.SafeLoader):
    pass


def _construct_tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Node:
    kind, _, target = tag_suffix.partition(":")
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    if kind == "ref":
        return Node("ref", str(value), None)
    return Node(kind, target, value)


_HyperLoader.add_multi_constructor("!", _construct_tagged)

_REF = re.compile(r"<([^<>]+)>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv}


def _eval_arith(expr: str) -> Any:
    def ev(n: ast.AST) -> Any:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        raise ConfigError(f"unsupported expression in !ref: {expr!r}")
    return ev(ast.parse(expr, mode="eval"))


class HyperYaml:
    """The parsed tree with `!ref` resolved lazily against the top level."""

    def __init__(self, tree: dict, path: str):
        self.tree, self.path = tree, path

    def resolve(self, value: Any, _depth: int = 0) -> Any:
        if _depth > 50:
            raise ConfigError(f"{self.path}: !ref cycle")
        if isinstance(value, Node) and value.tag == "ref":
            expr = value.target.strip()
            refs = _REF.findall(expr)
            if len(refs) == 1 and expr == f"<{refs[0]}>":
                return self.resolve(self._lookup(refs[0], "!ref "), _depth + 1)
            text = _REF.sub(lambda m: repr(self.resolve(self._lookup(m.group(1), "!ref "), _depth + 1)), expr)
            return _eval_arith(text)
        if isinstance(value, Node):
            return Node(value.tag, value.target, self.resolve(value.value, _depth + 1))
        if isinstance(value, dict):
            return {k: self.resolve(v, _depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, _depth + 1) for v in value]
        return value

    def _lookup(self, dotted: str, how: str = "") -> Any:
        cur: Any = self.tree
        for part in dotted.split("."):
            if isinstance(cur, Node):
                cur = cur.value
            if not isinstance(cur, dict) or part not in cur:
                raise ConfigError(f"{self.path}: {how}<{dotted}> is not defined" if how
                                  else f"{self.path}: no '{dotted}' entry")
            cur = cur[part]
        return cur

    def get(self, key: str) -> Any:
        return self.resolve(self._lookup(key))


def load_hyper_yaml(path: str) -> HyperYaml:
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            tree = yaml.load(f, Loader=_HyperLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return HyperYaml(tree, path)


def _kwargs(node: Any, where: str, cls_name: str) -> dict:
    if not isinstance(node, Node) or node.tag != "new":
        raise ConfigError(f"{where}: expected a !new: object, found {node!r:.80}")
    if node.target.rpartition(".")[2] != cls_name:
        raise ConfigError(f"{where}: expected {cls_name}, found {node.target}")
    return dict(node.value or {})


@dataclass
class Qwen2Config:
    """The fields of `CosyVoice-BlankEN/config.json` that the Qwen2 body needs."""
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    vocab_size: int = 151936
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str) -> "Qwen2Config":
        if not os.path.isfile(path):
            raise ConfigError(f"{path} not found: CosyVoice-BlankEN/ must hold the Qwen2 config.json and tokenizer files")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_json_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "bfloat16",
                  "bos_token_id": 151643, "eos_token_id": 151643, "use_sliding_window": False,
                  "sliding_window": d["max_position_embeddings"], "max_window_layers": d["num_hidden_layers"],
                  "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True})
        return d


def _llm(hy: HyperYaml, path: str, llm_class: str) -> dict:
    """The LM's kwargs (without the nested encoder object) and its sampling kwargs."""
    llm = _kwargs(hy.get("llm"), f"{path}: llm", llm_class)
    sampling_node = llm.pop("sampling", None)
    llm.pop("llm", None)
    sampling = dict(sampling_node.value or {}) if isinstance(sampling_node, Node) else {}
    return dict(llm=llm, sampling=sampling)


def _common(hy: HyperYaml, model_dir: str) -> dict:
    """What both families' yamls hold alike besides the networks: the top-level rates, the mel
    extractor, and the Qwen2 body config from CosyVoice-BlankEN/config.json."""
    feat = hy.get("feat_extractor")
    feat = dict(feat.value or {}) if isinstance(feat, Node) else {}
    qwen2 = Qwen2Config.from_json(os.path.join(model_dir, "CosyVoice-BlankEN", "config.json"))
    return dict(sample_rate=int(hy.get("sample_rate")), token_frame_rate=int(hy.get("token_frame_rate")),
                token_mel_ratio=int(hy.get("token_mel_ratio")), chunk_size=int(hy.get("chunk_size")),
                feat_extractor=feat, qwen2=qwen2)


def _cfm(node: Any, where: str) -> dict:
    """CausalConditionalCFM kwargs with `cfm_params` (!new:omegaconf.DictConfig {content: ...})
    flattened in; the estimator is left in for the caller to pop."""
    cfm = _kwargs(node, where, "CausalConditionalCFM")
    params = cfm.pop("cfm_params", None)
    if isinstance(params, Node):
        params = (params.value or {}).get("content", params.value)
    cfm.update(params or {})
    return cfm


# The official CosyVoice3 tokenizer adds its special tokens at load time, after the ids the
# tokenizer files declare; the first one is <|endofprompt|> (151646 with the Qwen2 files).
ENDOFPROMPT_ID = 151646
ENDOFPROMPT = "<|endofprompt|>"


def endofprompt_id(blank_en_dir: str) -> int:
    """The id `<|endofprompt|>` gets from the official CosyVoice3 tokenizer over these files: its
    own entry if tokenizer_config.json declares it, else the first id after every declared one (the
    official `add_special_tokens` appends it after `<|im_start|>`/`<|im_end|>`, which Qwen2 declares).
    Without the file: the official hard-coded 151646."""
    path = os.path.join(blank_en_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return ENDOFPROMPT_ID
    with open(path, encoding="utf-8") as f:
        try:
            added = json.load(f).get("added_tokens_decoder") or {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from e
    ids = {v.get("content"): int(k) for k, v in added.items() if isinstance(v, dict)}
    if ENDOFPROMPT in ids:
        return ids[ENDOFPROMPT]
    vocab = os.path.join(blank_en_dir, "vocab.json")
    if not ids or not os.path.isfile(vocab):
        return ENDOFPROMPT_ID
    with open(vocab, encoding="utf-8") as f:
        num_bpe = len(json.load(f))
    return max(max(ids.values()), num_bpe - 1) + 1


class YamlLayout(NamedTuple):
    """A family's yaml: its file name and the official class each entry the config reads must be."""
    yaml: str
    llm: str
    flow: str
    estimator: str        # flow.decoder.estimator
    hift: str
    f0_predictor: str     # hift.f0_predictor
    flow_part: Tuple[str, str, str]  # the flow's part before its decoder: (config field, flow kwarg, class)


@dataclass(kw_only=True)
class ModelConfig:
    """Constructor arguments of each official module of one family, keyed by the yaml's names.

    A family's subclass names its yaml's LAYOUT and holds the kwargs of the flow's part before the
    decoder (LAYOUT.flow_part); `load` reads a model directory without executing the yaml.
    """
    LAYOUT: ClassVar[YamlLayout]

    sample_rate: int
    token_frame_rate: int
    token_mel_ratio: int
    chunk_size: int
    llm: dict            # the LM's kwargs (without the nested llm/sampling objects)
    sampling: dict       # ras_sampling kwargs: top_p, top_k, win_size, tau_r
    flow: dict           # the flow's kwargs (without its flow part and decoder)
    cfm: dict            # CausalConditionalCFM kwargs (without estimator); cfm_params flattened
    estimator: dict      # the CFM estimator's kwargs (a !ref like static_chunk_size evaluated)
    hift: dict           # the vocoder's kwargs (without f0_predictor)
    f0_predictor: dict   # the F0 predictor's kwargs
    feat_extractor: dict  # mel_spectrogram kwargs for the prompt feat
    qwen2: Qwen2Config = field(default_factory=Qwen2Config)

    @classmethod
    def load(cls, model_dir: str) -> "ModelConfig":
        layout = cls.LAYOUT
        path = os.path.join(model_dir, layout.yaml)
        hy = load_hyper_yaml(path)
        llm = _llm(hy, path, layout.llm)
        flow = _kwargs(hy.get("flow"), f"{path}: flow", layout.flow)
        part, key, part_class = layout.flow_part
        flow_part = _kwargs(flow.pop(key, None), f"{path}: flow.{key}", part_class)
        cfm = _cfm(flow.pop("decoder", None), f"{path}: flow.decoder")
        estimator = _kwargs(cfm.pop("estimator", None), f"{path}: flow.decoder.estimator", layout.estimator)
        hift = _kwargs(hy.get("hift"), f"{path}: hift", layout.hift)
        f0 = _kwargs(hift.pop("f0_predictor", None), f"{path}: hift.f0_predictor", layout.f0_predictor)
        return cls(**llm, flow=flow, **{part: flow_part}, cfm=cfm, estimator=estimator, hift=hift,
                   f0_predictor=f0, **_common(hy, model_dir), **cls._from_directory(model_dir))

    @classmethod
    def _from_directory(cls, model_dir: str) -> dict:
        """Fields a family reads from the directory besides the yaml and the Qwen2 config."""
        return {}


@dataclass(kw_only=True)
class CosyVoice2Config(ModelConfig):
    LAYOUT = YamlLayout("cosyvoice2.yaml", "Qwen2LM", "CausalMaskedDiffWithXvec", "CausalConditionalDecoder",
                        "HiFTGenerator", "ConvRNNF0Predictor", ("encoder", "encoder", "UpsampleConformerEncoder"))
    encoder: dict        # UpsampleConformerEncoder kwargs


@dataclass(kw_only=True)
class CosyVoice3Config(ModelConfig):
    LAYOUT = YamlLayout("cosyvoice3.yaml", "CosyVoice3LM", "CausalMaskedDiffWithDiT", "DiT", "CausalHiFTGenerator",
                        "CausalConvRNNF0Predictor", ("pre_lookahead", "pre_lookahead_layer", "PreLookaheadLayer"))
    pre_lookahead: dict  # PreLookaheadLayer kwargs
    endofprompt_id: int = ENDOFPROMPT_ID  # text id of <|endofprompt|> in this directory's tokenizer

    @classmethod
    def _from_directory(cls, model_dir: str) -> dict:
        return {"endofprompt_id": endofprompt_id(os.path.join(model_dir, "CosyVoice-BlankEN"))}


def load_cosyvoice2_config(model_dir: str) -> CosyVoice2Config:
    return CosyVoice2Config.load(model_dir)


def load_cosyvoice3_config(model_dir: str) -> CosyVoice3Config:
    return CosyVoice3Config.load(model_dir)
