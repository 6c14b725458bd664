"""Counter-based Philox 4x32-10 noise, in torch integer ops.

Every backend draws the same Gaussian noise for the same
(seed, step, group, element):

* the host derives one 64-bit key per (seed, step, group) with Philox itself
  (:func:`group_key`, plain Python integers);
* elements ``4j .. 4j + 3`` of that group's noise are ``tl.randn4x(key, j)``
  exactly as ``triton/language/random.py`` defines it: one Philox 4x32-10 call
  with counter ``(j_lo, j_hi, 0, 0)`` and key ``(key_lo, key_hi)``, its four
  words mapped to uniforms and through Box-Muller on both pairs (r cos, r sin
  of the first pair, then of the second). Four Gaussians per call: the call is
  most of a draw's cost (the stream of 2026-11 drew one per call, ``tl.randn``).

So a kernel computes ``tl.randn4x(key, e // 4)`` for its elements e and keeps
component ``e % 4`` (contiguous blocks: interleaved, one call per four
elements), whatever its block size or grid, and gets these numbers (bit-equal
uint32s; floats equal up to the device's log/cos/sin rounding).

torch has no usable uint32/uint64 arithmetic, so words are held in int64
tensors with values in [0, 2**32) and the 32x32->64 products are split in
16-bit halves so that nothing overflows int64.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57  # round multipliers
N_ROUNDS = 10
# triton's uint_to_uniform_float: largest scale with MAX_INT * scale < 1.0 in float32
UNIFORM_SCALE = 4.6566127342e-10
TWO_PI = 6.283185307179586
# tags the key derivation, so that group keys never collide with raw seeds
_DOMAIN = 0xA11ADB07


def _mul_hi_lo_split(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * x) >> 32 and (a * x) & MASK32 for a 32-bit constant a, x in [0, 2**32),
    from 16-bit halves so that no product leaves int64."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    p_hi, p_lo = a * x_hi, a * x_lo  # each < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = ((p_hi << 16) + p_lo) & MASK32
    return hi, lo


def _mul_hi_lo_wrap(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from one int64 product that wraps mod 2**64 (its bits are the uint64 product)."""
    p = x * a
    return (p >> 32) & MASK32, p & MASK32


def _int64_mul_wraps() -> bool:
    x = torch.tensor([MASK32, 0x89ABCDEF], dtype=torch.int64)
    return all(torch.equal(u, v) for a in (ROUND_A, ROUND_B)
               for u, v in zip(_mul_hi_lo_wrap(a, x), _mul_hi_lo_split(a, x)))


# int64 overflow is not defined behaviour in C++: use the 2.5x faster wrapping
# product only where this build of torch is seen to wrap
_mul_hi_lo = _mul_hi_lo_wrap if _int64_mul_wraps() else _mul_hi_lo_split


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, n_rounds: int = N_ROUNDS):
    """Philox 4x32 on int64 tensors holding uint32 values; key words are ints."""
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def philox4x32_int(ctr: tuple[int, int, int, int], key: tuple[int, int],
                   n_rounds: int = N_ROUNDS) -> tuple[int, int, int, int]:
    """The same function on plain Python integers (host-side key derivation)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(n_rounds):
        pb, pa = ROUND_B * c2, ROUND_A * c0
        c0, c1, c2, c3 = ((pb >> 32) ^ c1 ^ k0) & MASK32, pb & MASK32, ((pa >> 32) ^ c3 ^ k1) & MASK32, pa & MASK32
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def group_key(seed: int, step: int, group: int) -> int:
    """64-bit key of one (seed, step, group) noise stream."""
    if not (0 <= seed < 2**64 and 0 <= step < 2**64 and 0 <= group < 2**32):
        raise ValueError(f"seed/step must be in [0, 2**64) and group in [0, 2**32), got {seed}, {step}, {group}")
    w = philox4x32_int((step & MASK32, step >> 32, group, _DOMAIN), (seed & MASK32, seed >> 32))
    return w[0] | (w[1] << 32)


def group_keys(seed: int, step: int, groups: list) -> list:
    """group_key of each group of one (seed, step) (the compiled one: anadp.backends.cpu.group_keys)."""
    return [group_key(seed, step, g) for g in groups]


def randint4x(key: int, offsets: torch.Tensor):
    """triton.language.randint4x(key, offsets): four uint32 words (as int64) per offset."""
    offsets = offsets.to(torch.int64)
    zero = torch.zeros_like(offsets)
    return philox4x32(offsets & MASK32, offsets >> 32, zero, zero, key & MASK32, (key >> 32) & MASK32)


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """triton's uint_to_uniform_float for 32-bit words: a float32 in [0, 1)."""
    x = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def randn4x(key: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """triton.language.randn4x(key, counters): four float32 N(0, 1) per counter, Box-Muller on the
    word pairs (1, 2) and (3, 4)."""
    i1, i2, i3, i4 = randint4x(key, counters)
    two_pi = torch.tensor(TWO_PI, dtype=torch.float32)
    out = []
    for a, b in ((i1, i2), (i3, i4)):
        u = uint_to_uniform(a).clamp_(min=1.0e-7)
        th = two_pi * uint_to_uniform(b)
        r = torch.sqrt(-2.0 * torch.log(u))
        out += [r * torch.cos(th), r * torch.sin(th)]
    return tuple(out)


def randn(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """Element ``offsets`` of the stream of ``key``: component offset % 4 of randn4x(key, offset // 4)."""
    offsets = offsets.to(torch.int64)
    z = torch.stack(randn4x(key, offsets >> 2), dim=-1)
    return z.gather(-1, (offsets & 3).unsqueeze(-1)).squeeze(-1)


def _randn_range(key: int, start: int, stop: int, device=None) -> torch.Tensor:
    """Elements start .. stop - 1 of the stream: one randn4x call per four elements."""
    j0, j1 = start >> 2, (stop + 3) >> 2
    z = torch.stack(randn4x(key, torch.arange(j0, j1, device=device, dtype=torch.int64)), dim=1).flatten()
    return z[start - 4 * j0:stop - 4 * j0]


def gaussian(seed: int, step: int, group: int, shape, device=None, chunk: int = 1 << 16) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` for one (seed, step, group).

    Element e (row-major) is ``randn(group_key(seed, step, group), e)``: component e % 4 of
    ``randn4x(key, e // 4)``."""
    return gaussian_of_key(group_key(seed, step, group), shape, device, chunk)


def gaussian_of_key(key: int, shape, device=None, chunk: int = 1 << 16, start: int = 0) -> torch.Tensor:
    """The same for a key, from element ``start`` of the stream on (a shard of a larger tensor);
    computed in chunks that keep the int64 temporaries in cache (2**16: ~5x faster than 2**22 on
    the CPU)."""
    n = 1
    for s in shape:
        n *= int(s)
    out = torch.empty(n, dtype=torch.float32, device=device)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        out[a:b] = _randn_range(key, start + a, start + b, device)
    return out.view(tuple(shape))
