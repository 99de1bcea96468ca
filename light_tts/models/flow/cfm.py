"""Conditional flow matching sampler (official CausalConditionalCFM, inference only).

Euler steps on a cosine time grid t_k = 1 - cos(pi/2 * k/n), classifier-free guidance
with the conditional and unconditional halves in one doubled batch:
    v = (1 + w) * v(x | mu, spk, cond) - w * v(x | 0, 0, 0),  w = inference_cfg_rate.
The start noise is the official fixed tensor: the first T columns of
torch.randn(1, 80, 15000) drawn right after seeding 0.
"""
from __future__ import annotations

import torch
from torch import nn

NOISE_FRAMES = 50 * 300  # the official buffer: 300 s of mel at 50 Hz
_NOISE: torch.Tensor | None = None


def fixed_noise() -> torch.Tensor:
    """The official (1, 80, 15000) start noise, fp32 on CPU, built once per process from a
    private generator so the global RNG state is left untouched."""
    global _NOISE
    if _NOISE is None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        _NOISE = torch.randn([1, 80, NOISE_FRAMES], generator=gen)
    return _NOISE


class CausalConditionalCFM(nn.Module):
    def __init__(self, in_channels: int = 240, n_spks: int = 1, spk_emb_dim: int = 80,
                 estimator: nn.Module | None = None, cfm_params: dict | None = None,
                 sigma_min: float = 1e-6, solver: str = "euler", t_scheduler: str = "cosine",
                 training_cfg_rate: float = 0.2, inference_cfg_rate: float = 0.7, reg_loss_type: str = "l1",
                 **unused):
        """Keyword names as the official yaml (cfm_params may come nested or flattened)."""
        super().__init__()
        params = dict(sigma_min=sigma_min, solver=solver, t_scheduler=t_scheduler,
                      inference_cfg_rate=inference_cfg_rate)
        params.update({k: v for k, v in (cfm_params or {}).items() if k in params})
        if params["solver"] != "euler":
            raise ValueError(f"CFM solver {params['solver']!r} not supported (only 'euler')")
        self.n_feats, self.n_spks, self.spk_emb_dim = in_channels, n_spks, spk_emb_dim
        self.sigma_min = float(params["sigma_min"])
        self.t_scheduler = params["t_scheduler"]
        self.inference_cfg_rate = float(params["inference_cfg_rate"])
        self.estimator = estimator

    def time_grid(self, n_timesteps: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        t_span = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
        if self.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        return t_span

    @staticmethod
    def initial_noise(frames: int, device: torch.device, dtype: torch.dtype, temperature: float = 1.0) -> torch.Tensor:
        """(1, 80, frames): the same columns for every request (broadcast over the batch)."""
        if frames > NOISE_FRAMES:
            raise ValueError(f"flow: {frames} mel frames exceed the fixed noise ({NOISE_FRAMES} frames, 300 s)")
        return fixed_noise()[:, :, :frames].to(device).to(dtype) * temperature

    @torch.inference_mode()
    def forward(self, mu: torch.Tensor, mask: torch.Tensor, n_timesteps: int, temperature: float = 1.0,
                spks: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                streaming: bool = False) -> tuple[torch.Tensor, None]:
        """mu, cond (B, 80, T); mask (B, 1, T); spks (B, 80) -> (mel (B, 80, T) float32, None)."""
        z = self.initial_noise(mu.size(2), mu.device, mu.dtype, temperature).expand(mu.size(0), -1, -1)
        t_span = self.time_grid(n_timesteps, mu.device, mu.dtype)
        return self.solve_euler(z, t_span, mu, mask, spks, cond, streaming), None

    def solve_euler(self, x: torch.Tensor, t_span: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor,
                    spks: torch.Tensor, cond: torch.Tensor, streaming: bool = False) -> torch.Tensor:
        """Fixed-step Euler from t_span[0] to t_span[-1]. The time is advanced as t += dt and
        dt re-derived from the grid each step, exactly like the official loop."""
        b = x.size(0)
        dtype = spks.dtype  # official: estimator inputs take the speaker embedding's dtype
        # doubled batch [conditional; unconditional]: the second half has mu = spks = cond = 0
        mask_in = torch.cat([mask, mask], dim=0).to(dtype)
        mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0).to(dtype)
        spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0).to(dtype)
        cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0).to(dtype)
        w = self.inference_cfg_rate
        t, dt = t_span[0].unsqueeze(0), t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            x_in = torch.cat([x, x], dim=0).to(dtype)
            t_in = t.to(dtype).expand(2 * b)
            v = self.estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in, streaming=streaming)
            v_cond, v_uncond = v[:b], v[b:]
            x = x + dt * ((1.0 + w) * v_cond - w * v_uncond)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x.float()
