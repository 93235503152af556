"""Which int4 tensors `--ratio` keeps at int8: those int4 would change most.

The ranking is data-free, in the spirit of NNCF's weight-quantization-error criterion: each tensor's relative
error ||W - int4(W)|| / ||W|| under its own int4 scheme. Tensors go to int8 in falling order of that error until
int8 holds at least 1 - ratio of the int4 roles' parameters, so that int4 holds at most `ratio` of them.
"""

from collections.abc import Callable, Iterable

import numpy as np

from .schemes import Scheme, dequantize_int4, int4_groups


def int4_error(chunks: Iterable[np.ndarray], scheme: Scheme) -> float:
    """||W - int4(W)|| / ||W|| over a tensor read a chunk of rows at a time."""
    error = norm = 0.0
    for chunk in chunks:
        rows = chunk.reshape(-1, chunk.shape[-1]).astype(np.float64)
        packed, scale, zero = int4_groups(rows, scheme.group, scheme.sym)
        error += float(np.square(dequantize_int4(packed, scale, zero) - rows).sum())
        norm += float(np.square(rows).sum())
    return (error / norm) ** 0.5 if norm else 0.0


def backup_tensors(tensors: dict[str, tuple[tuple, Scheme]], read: Callable[[str], Iterable[np.ndarray]],
                   ratio: float) -> tuple[set[str], float]:
    """The names to keep at int8 among `tensors` (name -> (shape, int4 scheme)), and the share of their
    parameters that stays int4."""
    sizes = {name: int(np.prod(shape)) for name, (shape, _) in tensors.items()}
    total = sum(sizes.values())
    if ratio >= 1 or not total:
        return set(), 1.0
    errors = {name: int4_error(read(name), scheme) for name, (_, scheme) in tensors.items()}
    backup, kept_int8 = set(), 0
    for name in sorted(errors, key=lambda n: (-errors[n], n)):
        if kept_int8 >= (1 - ratio) * total:
            break
        backup.add(name)
        kept_int8 += sizes[name]
    return backup, 1 - kept_int8 / total
