"""CosyVoice2 flow model (speech tokens -> mel), weight-compatible with the official flow.pt."""
from .cfm import CausalConditionalCFM, fixed_noise
from .encoder import UpsampleConformerEncoder
from .estimator import CausalConditionalDecoder
from .flow import CausalMaskedDiffWithXvec, build_flow

__all__ = ["CausalConditionalCFM", "CausalConditionalDecoder", "CausalMaskedDiffWithXvec",
           "UpsampleConformerEncoder", "build_flow", "fixed_noise"]
