"""DeMo's compressed step written out (bloc97/DeMo), the exact reference of a compressed
round (sim/reference.py holds the round it plugs into): its own DCT (through torch.fft,
as DeMo's TransformDCT), its own top-k, 1-bit signs and scatter-mean, per-peer error
feedback across rounds, helper slabs as tensors of their own (restarted when their neurons
rotate). Mixed tiers align in the block domain: a narrow tensor's blocks are the leading
blocks of the wide one. It follows matsim's one deliberate deviation from DeMo unless told
otherwise (zero_blocks "sent"): an all-zero block sends nothing (the absent slot) instead
of k zeros that count in the mean. Shares no code with sim/distro.py or sim/aggregate.py."""
import math
from collections.abc import Sequence

import torch

from sim.config import ModelConfig
from sim.reference import (PeerInput, Round, applied, block_elements, chunk_of, combine, ffn_axis, layer_of,
                           peer_gradients)


def dct_matrix(n: int, dtype) -> torch.Tensor:
    """Orthonormal DCT-II as a matrix D (coefficients = D @ x), built by running an FFT-based
    DCT (Makhoul's reordering, as DeMo's TransformDCT does) over the identity."""
    eye = torch.eye(n, dtype=torch.float64)
    v = torch.cat([eye[:, ::2], eye[:, 1::2].flip([1])], dim=1)
    spectrum = torch.fft.fft(v, dim=1)
    k = torch.arange(n, dtype=torch.float64)
    coeffs = (spectrum * torch.exp(-1j * math.pi * k / (2 * n))).real
    coeffs[:, 0] *= math.sqrt(1 / n)
    coeffs[:, 1:] *= math.sqrt(2 / n)
    return coeffs.T.contiguous().to(dtype)   # row e_i of the identity gave column i


class _State(dict):
    """One peer's residuals by key, and the size of what each took in (`DeMo._step`)."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[str, float] = {}


class DeMo:
    """Per-peer DeMo state and one round of its compressed exchange (see the module doc)."""

    def __init__(self, chunk: int, topk: int, decay: float, quantize: bool, zero_blocks: str = "absent",
                 round_off: float = 1e-9):
        self.chunk, self.topk, self.decay, self.quantize = chunk, topk, decay, quantize
        self.zero_blocks = zero_blocks   # "sent": exact zeros go out and count, as +1 under 1-bit (DeMo, Psyche)
        self.round_off = round_off       # the implementation's round-off, relative to a step's inputs
        self.delta: dict[int, _State] = {}
        self.anchors: dict[int, dict[str, torch.Tensor]] = {}

    def _tiles(self, x: torch.Tensor):
        """x -> its blocks [blocks..., block numel] in DCT coefficients, and how to undo it."""
        sizes = [chunk_of(n, self.chunk) for n in x.shape]
        mats = [dct_matrix(b, x.dtype) for b in sizes]
        if x.ndim == 1:
            return x.reshape(-1, sizes[0]) @ mats[0].T, sizes, mats
        (rows, cols), (br, bc) = x.shape, sizes
        tiles = x.reshape(rows // br, br, cols // bc, bc).permute(0, 2, 1, 3)
        return (mats[0] @ tiles @ mats[1].T).reshape(rows // br, cols // bc, br * bc), sizes, mats

    @staticmethod
    def _untile(coeffs: torch.Tensor, sizes, mats) -> torch.Tensor:
        if len(sizes) == 1:
            return (coeffs @ mats[0]).reshape(-1)
        nr, nc, _ = coeffs.shape
        blocks = mats[0].T @ coeffs.reshape(nr, nc, *sizes) @ mats[1]
        return blocks.permute(0, 2, 1, 3).reshape(nr * sizes[0], nc * sizes[1])

    def _send(self, delta: torch.Tensor, error: float):
        """Top-k of delta's coefficients per block, as (indices, values, undecided): what was
        sent leaves delta (all of it when k keeps every coefficient); exactly-zero coefficients
        (an all-zero block's) count as not sent when combined. `undecided` marks the blocks whose
        choice round-off could make either way: the k-th and (k+1)-th magnitudes within `error`
        of each other (a tie: either choice is DeMo), or, under 1-bit, a coefficient sent whose
        magnitude is within `error` of zero (its sign is round-off)."""
        coeffs, sizes, mats = self._tiles(delta)
        k = min(self.topk, coeffs.shape[-1])
        magnitudes = coeffs.abs().sort(dim=-1, descending=True).values
        undecided = torch.zeros(coeffs.shape[:-1], dtype=torch.bool)
        if k < coeffs.shape[-1]:   # exact zeros are no tie: among equals, the lowest index goes first
            undecided = (magnitudes[..., k - 1] - magnitudes[..., k] <= error) & (magnitudes[..., k - 1] > 0)
        if self.quantize:
            undecided |= (magnitudes[..., k - 1] <= error) & (magnitudes[..., k - 1] > 0)
        idx = coeffs.abs().sort(dim=-1, descending=True, stable=True).indices[..., :k]
        val = coeffs.gather(-1, idx)
        if k == coeffs.shape[-1]:
            delta.zero_()
        else:
            delta.sub_(self._untile(torch.zeros_like(coeffs).scatter(-1, idx, val), sizes, mats))
        return idx, val, undecided

    def _step(self, state: dict, anchors: dict, key: str, grad: torch.Tensor, lr: float, anchor=None):
        """One DisTrO step of `state[key]` on `grad`: (indices, values, undecided blocks, the
        size of the step's inputs). A helper slab's residual restarts when its neurons change.

        The size is that of everything the state ever took in, decayed as the state is:
        s = decay s + lr max|grad|. The residual's round-off is a multiple of epsilon of that,
        not of the residual: once a rate of 0 has sent what was left, the residual is round-off
        of the rounds before, and so is all that is sent from it."""
        if anchor is not None and (key not in anchors or not torch.equal(anchors[key], anchor)):
            anchors[key] = anchor
            state.pop(key, None)
            state.sizes.pop(key, None)
        delta = state.setdefault(key, torch.zeros_like(grad))
        size = state.sizes[key] = self.decay * state.sizes.get(key, 0.0) + lr * float(grad.abs().max())
        delta.mul_(self.decay).add_(grad, alpha=lr)
        block = math.prod(chunk_of(n, self.chunk) for n in delta.shape)
        return (*self._send(delta, self.round_off * size * math.sqrt(block)), size)

    def round(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], peers: Sequence[PeerInput], lr: float,
              semantics: str, rule: str = "sign", weight_decay: float = 0.0, moments: dict | None = None) -> Round:
        """One round from the full `weights`. Blocks a peer's round-off could have chosen
        otherwise are listed in `self.tied` ({(peer, key): elements of its local tensor}) and
        left out of the round's `checked` elements: the caller adopts that peer's residual there
        (`adopt`). Helper slabs step under "helper:<name>", as their own tensors."""
        sent, self.tied = {}, {}   # sent: peer -> {key: (indices, values, local shape, helper neurons)}
        checked = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
        scale = dict.fromkeys(weights, 0.0)
        for peer in peers:
            if peer.fresh or peer.id not in self.delta:
                self.delta[peer.id], self.anchors[peer.id] = _State(), {}
            if not peer.steps:
                continue
            state, anchors = self.delta[peer.id], self.anchors[peer.id]
            for name, g in peer_gradients(cfg, weights, peer).items():
                axis = ffn_axis(name)
                steps = [(name, g.local, None)]
                if g.slab is not None:
                    steps.append(("helper:" + name, g.slab, peer.helpers[layer_of(name)].long()))
                for key, grad, neurons in steps:
                    idx, val, undecided, size = self._step(state, anchors, key, grad, lr, neurons)
                    if bool(undecided.any()):   # its residual is adopted, counted or not
                        self.tied[peer.id, key] = block_elements(undecided, grad.shape, self.chunk)
                    if peer.factor is None:
                        continue
                    if bool(undecided.any()):
                        region = checked[name] if axis is None else (
                            checked[name].narrow(axis, 0, grad.shape[axis]) if neurons is None
                            else checked[name].index_select(axis, neurons))
                        region &= ~self.tied[peer.id, key]
                        if neurons is not None:
                            checked[name].index_copy_(axis, neurons, region)
                    if self.quantize:   # "sent": the sign bit decides, so +0.0 goes out as +1
                        val = torch.where(val.signbit(), -1.0, 1.0).to(val) if self.zero_blocks == "sent" else val.sign()
                    scale[name] = max(scale[name], abs(peer.factor) * (1.0 if self.quantize else size))
                    sent.setdefault(peer.id, {})[key] = (idx, val * peer.factor, tuple(grad.shape), neurons)
        update = {name: self._combine(name, w, [s[name] for s in sent.values()],
                                      [s["helper:" + name] for s in sent.values() if "helper:" + name in s], semantics)
                  for name, w in weights.items()}
        return Round(update, *applied(weights, update, lr, rule, weight_decay, moments, len(sent), scale, checked))

    def adopt(self, peer: int, key: str, residual: torch.Tensor) -> None:
        """Take the implementation's residual on the blocks where this peer's choice was undecided."""
        mask = self.tied[peer, key]
        self.delta[peer][key] = torch.where(mask, residual.to(self.delta[peer][key].dtype), self.delta[peer][key])

    def _dense(self, idx, val, shape, dtype) -> torch.Tensor:
        """A payload's coefficients decoded in its own shape's blocks."""
        coeffs, sizes, mats = self._tiles(torch.zeros(shape, dtype=dtype))
        return self._untile(torch.zeros_like(coeffs).scatter(-1, idx, val), sizes, mats)

    def _combine(self, name, w, payloads, slabs, semantics) -> torch.Tensor:
        """The receiver's aggregate of one tensor from the payloads' (indices, values, shape) and
        the helper slabs that reach it. A slab is one more contributor to the elements of its
        neurons: in REGION_MEAN's cover, in PEER_MEAN's sum, and in COEFF_MEAN merged with the
        coefficient mean U of the C payloads that sent the element's block: (C U + slabs) / (C + h)."""
        axis = ffn_axis(name)
        extra, extra_count = torch.zeros_like(w), torch.zeros_like(w)
        for idx, val, shape, neurons in slabs:
            extra.index_add_(axis, neurons, self._dense(idx, val, shape, w.dtype))
            extra_count.index_add_(axis, neurons, torch.ones(shape, dtype=w.dtype))
        if semantics == "coeff_mean":   # per coefficient, over the peers that sent it, narrow blocks leading
            coeffs, sizes, mats = self._tiles(torch.zeros_like(w))
            total, count = torch.zeros_like(coeffs), torch.zeros_like(coeffs)
            sending = torch.zeros(coeffs.shape[:-1], dtype=w.dtype)
            for idx, val, shape, _ in payloads:
                present = torch.ones_like(val) if self.zero_blocks == "sent" else (val != 0).to(w.dtype)
                region = [slice(None)] * (coeffs.ndim - 1)
                if axis is not None:
                    region[axis] = slice(0, shape[axis] // sizes[axis])
                total[tuple(region)] += torch.zeros_like(total[tuple(region)]).scatter_add(-1, idx, val)
                count[tuple(region)] += torch.zeros_like(count[tuple(region)]).scatter_add(-1, idx, present)
                sending[tuple(region)] += (present.sum(-1) > 0).to(w.dtype)
            mean = self._untile(torch.where(count > 0, total / count.clamp(min=1), 0.0), sizes, mats)
            if not slabs:
                return mean
            c = block_elements(sending, w.shape, self.chunk)
            return torch.where(c + extra_count > 0, (c * mean + extra) / (c + extra_count).clamp(min=1), 0.0)
        total, cover = extra, extra_count
        for idx, val, shape, _ in payloads:
            region = [slice(None)] * w.ndim
            if axis is not None:
                region[axis] = slice(0, shape[axis])
            total[tuple(region)] += self._dense(idx, val, shape, w.dtype)
            cover[tuple(region)] += 1
        return combine({name: total}, {name: cover}, len(payloads), semantics)[name]


