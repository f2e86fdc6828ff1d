"""The SWAG posterior: sampling weights from it, fitting it to a model, and its file.

A draw is ``theta = mean + sqrt(scale) * (sigma * z1 + D z2 / sqrt(K - 1))`` with
``sigma = sqrt(var)``, ``z1 ~ N(0, I_d)`` and ``z2 ~ N(0, I_K)`` fresh for every sample, from a
seeded generator, so a posterior and a seed always give the same samples, in any process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from flcore import CodecError, FLCoreError, load_tensors, save_tensors, write_atomic
from flcore_swag.moments import DEV, MEAN, VAR, Gaussian

FILE = "swag.safetensors"
SUMMARY = "swag.json"
FORMAT = 1
BN = "bn/"


@attrs.frozen
class Posterior:
    """A moment-matched SWAG Gaussian, how to sample it, and per-sample BatchNorm statistics.

    ``batchnorm[i]`` holds the BatchNorm buffers (``running_mean``/``running_var`` by state-dict
    name) recomputed for sample ``i``; it is empty when the model has no BatchNorm or the
    statistics were not recomputed.
    """

    gaussian: Gaussian
    scale: float = 0.5
    samples: int = 30
    sample_seed: int = 0
    var_clamp: float = 1e-30
    batchnorm: Sequence[Mapping[str, torch.Tensor]] = attrs.field(factory=tuple, repr=False)
    info: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return self.gaussian.names

    @property
    def mean(self) -> Mapping[str, torch.Tensor]:
        return self.gaussian.mean

    @property
    def rank(self) -> int:
        return self.gaussian.rank

    def std(self) -> dict[str, torch.Tensor]:
        """sigma: the square root of the (clamped) variance; what multiplies z1."""
        return {n: self.gaussian.var[n].clamp_min(self.var_clamp).sqrt() for n in self.names}

    def combine(self, z1: Mapping[str, torch.Tensor], z2: torch.Tensor) -> dict[str, torch.Tensor]:
        """``mean + sqrt(scale) * (sigma * z1 + D z2 / sqrt(K - 1))`` for given noise (float64)."""
        if self.scale == 0:
            return {n: self.mean[n].clone() for n in self.names}
        root = math.sqrt(self.scale)
        std = self.std()
        rank = self.rank
        theta = {}
        for name in self.names:
            step = std[name] * z1[name]
            if rank:
                step = step + torch.tensordot(z2, self.gaussian.dev[name], dims=1) / math.sqrt(
                    rank - 1
                )
            theta[name] = self.mean[name] + root * step
        return theta

    def draw(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One sample. The noise is drawn in a fixed order (z2, then z1 name by name in the
        posterior's order), so the same generator state gives the same weights."""
        if self.scale == 0:
            return self.combine({}, torch.zeros(0, dtype=torch.float64))
        z2 = torch.randn(self.rank, generator=generator, dtype=torch.float64)
        z1 = {
            n: torch.randn(self.mean[n].shape, generator=generator, dtype=torch.float64)
            for n in self.names
        }
        return self.combine(z1, z2)

    def draws(self, count: int, seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """``count`` independent samples from ``seed`` (default: the posterior's own)."""
        generator = torch.Generator().manual_seed(self.sample_seed if seed is None else seed)
        for _ in range(count):
            yield self.draw(generator)

    def covariance(self) -> torch.Tensor:
        """The dense covariance ``scale * (diag(var) + D D^T / (K - 1))`` over the parameters
        flattened in the posterior's order; for small models (tests, inspection) only."""
        var = torch.cat(
            [self.gaussian.var[n].clamp_min(self.var_clamp).flatten() for n in self.names]
        )
        cov = torch.diag(var)
        if self.rank:
            dev = torch.cat([self.gaussian.dev[n].reshape(self.rank, -1) for n in self.names], 1)
            cov = cov + dev.T @ dev / (self.rank - 1)
        return self.scale * cov

    # -- fitting a model --------------------------------------------------------------

    def check_fits(self, model: torch.nn.Module, what: str = "the SWAG posterior") -> None:
        """Raise unless every parameter of ``model`` is in the posterior with its shape."""
        params = dict(model.named_parameters())
        missing = sorted(set(params) - set(self.names))
        extra = sorted(set(self.names) - set(params))
        if missing or extra:
            detail = f"no posterior for {missing[:3]}" if missing else f"unknown {extra[:3]}"
            raise FLCoreError(f"{what} does not fit the model: {detail}")
        for name in self.names:
            if tuple(params[name].shape) != tuple(self.mean[name].shape):
                raise FLCoreError(
                    f"{what} does not fit the model: {name!r} has shape "
                    f"{tuple(self.mean[name].shape)}, the model {tuple(params[name].shape)}"
                )
        buffers = dict(model.named_buffers())
        for stats in self.batchnorm[:1]:
            for key, value in stats.items():
                if key not in buffers or buffers[key].shape != value.shape:
                    raise FLCoreError(f"{what}: BatchNorm statistic {key!r} fits no buffer")

    def load_sample(
        self, model: torch.nn.Module, theta: Mapping[str, torch.Tensor], index: int | None = None
    ) -> None:
        """Copy ``theta`` into ``model``'s parameters by name (and sample ``index``'s
        BatchNorm statistics into its buffers, when the posterior has them)."""
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(theta[name])
            if index is not None and self.batchnorm:
                for key, value in self.batchnorm[index].items():
                    buffers[key].copy_(value)

    # -- the file ---------------------------------------------------------------------

    def to_payload(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = self.gaussian.to_tensors()
        for index, stats in enumerate(self.batchnorm):
            for key, value in stats.items():
                tensors[f"{BN}{index}/{key}"] = value
        meta = {
            "kind": "swag_posterior",
            "format": FORMAT,
            "names": list(self.names),
            "rank": self.rank,
            "scale": self.scale,
            "samples": self.samples,
            "sample_seed": self.sample_seed,
            "var_clamp": self.var_clamp,
            "batchnorm_samples": len(self.batchnorm),
            "info": dict(self.info),
        }
        return tensors, meta

    def save(self, run_dir: Path) -> Path:
        """Write ``swag.safetensors`` atomically, and ``swag.json`` (its metadata, for people)."""
        tensors, meta = self.to_payload()
        path = run_dir / FILE
        save_tensors(path, tensors, meta)
        write_atomic(run_dir / SUMMARY, (json.dumps(meta, indent=2) + "\n").encode())
        return path

    @classmethod
    def from_payload(
        cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], what: str
    ) -> Posterior:
        """Check and read what :meth:`to_payload` wrote; a malformed part is a CodecError."""
        if meta.get("kind") != "swag_posterior":
            raise CodecError(f"{what}: not a SWAG posterior (kind {meta.get('kind')!r})")
        if meta.get("format") != FORMAT:
            raise CodecError(f"{what}: unknown posterior format {meta.get('format')!r}")
        fields = {
            "scale": float,
            "samples": int,
            "sample_seed": int,
            "var_clamp": float,
            "batchnorm_samples": int,
            "rank": int,
            "info": dict,
        }
        for field, kind in fields.items():
            value = meta.get(field)
            ok = isinstance(value, int | float) if kind is float else isinstance(value, kind)
            if not ok or isinstance(value, bool):
                raise CodecError(f"{what}: field {field!r} must be {kind.__name__}, got {value!r}")
        if not (math.isfinite(meta["scale"]) and meta["scale"] >= 0):
            raise CodecError(f"{what}: scale must be a finite number >= 0")
        if meta["samples"] < 1 or meta["batchnorm_samples"] < 0 or meta["var_clamp"] < 0:
            raise CodecError(f"{what}: samples, batchnorm_samples or var_clamp out of range")
        gaussian = Gaussian.from_tensors(tensors, meta.get("names"), what)
        if gaussian.rank != meta["rank"]:
            raise CodecError(f"{what}: rank {meta['rank']} but {gaussian.rank} deviation columns")
        batchnorm = _read_batchnorm(tensors, meta["batchnorm_samples"], what)
        return cls(
            gaussian=gaussian,
            scale=float(meta["scale"]),
            samples=meta["samples"],
            sample_seed=meta["sample_seed"],
            var_clamp=float(meta["var_clamp"]),
            batchnorm=batchnorm,
            info=meta["info"],
        )

    @classmethod
    def load(cls, path: str | Path) -> Posterior:
        """Read a ``swag.safetensors``; a truncated or tampered file is a CodecError naming it."""
        tensors, meta = load_tensors(path)
        return cls.from_payload(tensors, meta, str(path))


def _read_batchnorm(
    tensors: Mapping[str, torch.Tensor], count: int, what: str
) -> tuple[dict[str, torch.Tensor], ...]:
    stats: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for key, value in tensors.items():
        if key.startswith((MEAN, VAR, DEV)):
            continue
        index, _, name = key.removeprefix(BN).partition("/")
        if not key.startswith(BN) or not index.isdigit() or int(index) >= count or not name:
            raise CodecError(f"{what}: unexpected tensor {key!r}")
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise CodecError(f"{what}: {key} is not finite floating point")
        stats[int(index)][name] = value
    if stats and any(set(s) != set(stats[0]) or not s for s in stats):
        raise CodecError(f"{what}: BatchNorm statistics differ between samples or are missing")
    return tuple(stats)
