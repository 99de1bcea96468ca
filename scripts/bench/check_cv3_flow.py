"""The CosyVoice3 flow, official code vs light_tts, on the same random weights (fp32, CPU).

Run with the official code's venv (torch, hyperpyyaml, omegaconf, einops, x-transformers, diffusers,
conformer, onnxruntime, transformers), a checkout of FunAudioLLM/CosyVoice, and Matcha-TTS (the
official third_party/Matcha-TTS submodule, or any checkout holding its `matcha/` package):

    PYTHONPATH=/path/to/CosyVoice:/path/to/this/repo OFFICIAL_COSYVOICE=/path/to/CosyVoice \
        [MATCHA_TTS=/path/to/Matcha-TTS] /path/to/venv/bin/python scripts/bench/check_cv3_flow.py \
        [--tiny] [--full] [--yaml shared/reference/cosyvoice3.yaml] [--print-keys]

Both models are built from the `flow:` entry of the official cosyvoice3.yaml (with the top-level
scalars it refers to): the official one by hyperpyyaml exactly as the official loader does, ours by
light_tts.models.flow.flow_dit.build_dit_flow from the kwargs our yaml reader extracts. --tiny
rewrites the sizes first (width 64, depth 2, 2 heads of 32, pre-lookahead width 64, chunk_size 10
tokens = 20 frames). The official model's random (seeded) state dict is loaded into ours strictly,
then flow.inference is compared for: non-streaming finalize, the first streaming chunk
(finalize=False), a second streaming chunk, and streaming finalize. The negative control scales
one of our weights by 1.001 and must show a clearly larger difference.

Import-only stubs (never used for math): scripts/bench/official_env.stub_training_imports, as for
scripts/bench/check_against_official.py: the official flow module pulls in the whole package through
cosyvoice.utils.class_utils.
"""
import argparse
import os
import re
import tempfile

MAIN = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_YAML = os.path.join(os.path.dirname(MAIN), "shared", "reference", "cosyvoice3.yaml")
TINY_SIZES = {"channels": 64, "dim": 64, "depth": 2, "heads": 2, "dim_head": 32}
TINY_CHUNK_TOKENS = 10


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--yaml", default=DEFAULT_YAML)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-tokens", type=int, default=25)
    ap.add_argument("--tokens", type=int, default=53)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--print-keys", action="store_true", help="print the tiny official state-dict keys and shapes")
    args = ap.parse_args(argv)
    if not (args.tiny or args.full):
        args.tiny = args.full = True
    return args


ARGS = parse_args() if __name__ == "__main__" else None
import official_env  # noqa: E402  (sys.path: the official checkout, Matcha-TTS, this repository)

import torch  # noqa: E402

official_env.stub_training_imports()

from hyperpyyaml import load_hyperpyyaml  # noqa: E402
import cosyvoice.flow.flow  # noqa: E402,F401  (the class the yaml names)

from light_tts.models.config import Node, load_hyper_yaml  # noqa: E402
from light_tts.models.flow.cfm import fixed_noise  # noqa: E402
from light_tts.models.flow.flow_dit import build_dit_flow  # noqa: E402
from model_util import key_shapes  # noqa: E402


# ---------------------------------------------------------------- the flow entry of the yaml
def flow_yaml_text(path: str, tiny: bool) -> str:
    """The `flow:` entry plus every plain top-level scalar (what its !ref's point at)."""
    text = open(path, encoding="utf-8").read()
    blocks = re.split(r"(?m)^(?=[A-Za-z_][\w]*:)", text)
    keep = []
    for b in blocks:
        head = b.split("\n", 1)[0]
        m = re.match(r"([A-Za-z_]\w*):\s*(.*)$", head)
        if not m:
            continue
        key, rest = m.groups()
        if key == "flow" or (rest and not rest.lstrip().startswith("!") and not rest.startswith("[")):
            keep.append(b)
    out = "".join(keep)
    if tiny:
        flow_start = out.index("\nflow:")
        head, flow = out[:flow_start], out[flow_start:]
        for key, value in TINY_SIZES.items():
            flow, n = re.subn(rf"(?m)^(\s+){key}: \d+\s*$", rf"\g<1>{key}: {value}", flow)
            assert n == 1, f"tiny: expected one '{key}:' in the flow entry, found {n}"
        head, n = re.subn(r"(?m)^chunk_size: \d+", f"chunk_size: {TINY_CHUNK_TOKENS}", head)
        assert n == 1
        out = head + flow
    return out


def our_kwargs(path: str) -> tuple[dict, dict, dict, dict]:
    """(flow, pre_lookahead_layer, decoder with cfm_params flattened, estimator) constructor kwargs."""
    flow = dict(load_hyper_yaml(path).get("flow").value)
    pre = dict(flow.pop("pre_lookahead_layer").value)
    cfm = dict(flow.pop("decoder").value)
    est = dict(cfm.pop("estimator").value)
    params = cfm.pop("cfm_params")
    if isinstance(params, Node):
        params = (params.value or {}).get("content", params.value)
    cfm.update(params)
    return flow, pre, cfm, est


def build_pair(yaml_path: str, tiny: bool, seed: int):
    text = flow_yaml_text(yaml_path, tiny)
    torch.manual_seed(seed)
    official = load_hyperpyyaml(text)["flow"].eval()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        ours = build_dit_flow(*our_kwargs(f.name)).eval()
    finally:
        os.unlink(f.name)
    sd = official.state_dict()
    ok = [(k, tuple(v.shape)) for k, v in sd.items()] == [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    print(f"  state dict: {len(sd)} keys, names/shapes/order equal: {ok}")
    assert ok
    ours.load_state_dict(sd, strict=True)
    return official, ours


def make_inputs(n_prompt: int, n_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    return dict(prompt_token=torch.randint(0, 6561, (1, n_prompt), generator=g, dtype=torch.int32),
                token=torch.randint(0, 6561, (1, n_tokens), generator=g, dtype=torch.int32),
                prompt_feat=torch.randn(1, 2 * n_prompt, 80, generator=g),
                embedding=torch.randn(1, 192, generator=g))


def run_flow(flow, inp: dict, n_tokens: int, streaming: bool, finalize: bool) -> torch.Tensor:
    ln = lambda t: torch.tensor([t.shape[1]], dtype=torch.int32)  # noqa: E731
    token = inp["token"][:, :n_tokens]
    mel, _ = flow.inference(token=token, token_len=ln(token), prompt_token=inp["prompt_token"],
                            prompt_token_len=ln(inp["prompt_token"]), prompt_feat=inp["prompt_feat"],
                            prompt_feat_len=ln(inp["prompt_feat"]), embedding=inp["embedding"],
                            streaming=streaming, finalize=finalize)
    return mel


def compare(name: str, tiny: bool, args) -> None:
    print(f"== {name}")
    official, ours = build_pair(args.yaml, tiny, args.seed)
    n_params = sum(p.numel() for p in official.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    n_dit = sum(p.numel() for p in official.decoder.estimator.parameters())
    print(f"  parameters: official {n_params:,}  ours {n_ours:,}  (official DiT {n_dit:,})")
    noise_ok = torch.equal(official.decoder.rand_noise, fixed_noise())
    print(f"  fixed noise equal to light_tts.models.flow.cfm.fixed_noise(): {noise_ok}")
    assert noise_ok
    if tiny and args.print_keys:  # tests/fixtures/official_keys/cv3_flow_tiny.txt
        print("  official tiny keys:")
        print("\n".join(key_shapes(official.state_dict())))

    chunk = official.decoder.estimator.static_chunk_size // official.token_mel_ratio  # tokens per chunk
    k = official.pre_lookahead_len
    # the prompt is padded to a whole chunk by the streaming schedule (token2wav.StreamSchedule.first_hop)
    first = -(-args.prompt_tokens // chunk) * chunk - args.prompt_tokens + chunk
    inp = make_inputs(args.prompt_tokens, args.tokens, args.seed)
    modes = [("non-streaming finalize", args.tokens, False, True),
             (f"streaming chunk 1 ({first}+{k} tokens)", first + k, True, False),
             (f"streaming chunk 2 ({first + chunk}+{k} tokens)", first + chunk + k, True, False),
             ("streaming finalize", args.tokens, True, True)]
    print(f"  prompt {args.prompt_tokens} tokens, {args.tokens} new tokens, chunk {chunk} tokens")
    for label, n, streaming, finalize in modes:
        ref = run_flow(official, inp, n, streaming, finalize)
        got = run_flow(ours, inp, n, streaming, finalize)
        assert ref.shape == got.shape, (ref.shape, got.shape)
        diff = (ref - got).abs().max().item()
        peak = ref.abs().max().item()
        print(f"  {label:34s} {tuple(ref.shape)}  max|diff| {diff:.3e}  max|mel| {peak:.3f}  "
              f"rel {diff / peak:.2e}")
    depth = len(ours.decoder.estimator.transformer_blocks)
    name_w = f"decoder.estimator.transformer_blocks.{depth // 2}.ff.ff.2.weight"
    with torch.no_grad():
        ours.state_dict()[name_w].mul_(1.001)
    ref = run_flow(official, inp, args.tokens, False, True)
    got = run_flow(ours, inp, args.tokens, False, True)
    print(f"  negative control ({name_w} x1.001): max|diff| {(ref - got).abs().max().item():.3e}")


def main(args) -> None:
    torch.set_num_threads(args.threads)
    print(f"official {official_env.OFFICIAL}, yaml {args.yaml}, torch {torch.__version__}")
    if args.tiny:
        compare("tiny", True, args)
    if args.full:
        compare("full (the yaml's sizes)", False, args)


if __name__ == "__main__":
    main(ARGS)
