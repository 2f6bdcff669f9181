"""Improved precision and recall (Kynkaanniemi et al. 2019) of feature vectors, on the device.

The manifold of a set Phi is the union of the balls B(phi, r_k(phi)) over phi in Phi, r_k(phi)
the distance from phi to its k-th nearest neighbour in Phi (phi itself excluded, a duplicate of
phi included). With real features Phi_r and generated features Phi_g:

    precision = |{g in Phi_g : ||g - phi|| <= r_k(phi) for some phi in Phi_r}| / |Phi_g|
    recall    = |{r in Phi_r : ||r - phi|| <= r_k(phi) for some phi in Phi_g}| / |Phi_r|

k = 3 on the FID Inception pool features is ADM's evaluator (Dhariwal & Nichol 2021). Distances
are compared squared, ||x||^2 - 2 x.y + ||y||^2 in float32 at HIGHEST precision (the square is
monotone, so every comparison is the same). A block of query rows, sharded over the mesh, meets
the other set one column chunk at a time inside one `lax.scan`: a device holds the set (N x D)
and a [rows / devices, chunk] block of distances, never N x N.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_diffusion.runtime import parallel

NEAREST_K = 3
ROW_BATCH = 1024
COLUMN_CHUNK = 8192
_PRECISION = jax.lax.Precision.HIGHEST


def _squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
    """[B, D], [C, D] -> [B, C]: ||x_i - y_j||^2, round-off negatives clamped to 0."""
    cross = jnp.dot(x, y.T, precision=_PRECISION)
    squared = jnp.sum(x * x, axis=1)[:, None] - 2.0 * cross + jnp.sum(y * y, axis=1)[None, :]
    return jnp.maximum(squared, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_smallest(queries: jax.Array, chunks: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """The (k+1)-th smallest squared distance of each query to the chunked set, which holds the
    query itself: its k-th nearest neighbour. The k+1 smallest so far are carried across chunks."""
    def merge(best, chunk):
        columns, ok = chunk
        distances = jnp.where(ok[None, :], _squared_distances(queries, columns), jnp.inf)
        smallest, _ = jax.lax.top_k(-jnp.concatenate([best, distances], axis=1), k + 1)
        return -smallest, None

    start = jnp.full((queries.shape[0], k + 1), jnp.inf, jnp.float32)
    best, _ = jax.lax.scan(merge, start, (chunks, valid))
    return best[:, k]


@jax.jit
def _covered(queries: jax.Array, chunks: jax.Array, radii: jax.Array) -> jax.Array:
    """Whether each query lies within the radius of some point of the chunked set (padding rows
    carry radius -1, which no squared distance meets)."""
    def test(hit, chunk):
        columns, chunk_radii = chunk
        inside = _squared_distances(queries, columns) <= chunk_radii[None, :]
        return hit | jnp.any(inside, axis=1), None

    hit, _ = jax.lax.scan(test, jnp.zeros(queries.shape[0], bool), (chunks, radii))
    return hit


def _chunked(array: np.ndarray, chunk_size: int, fill: float) -> np.ndarray:
    """[N, ...] -> [ceil(N / chunk), chunk, ...], the tail padded with `fill`."""
    chunks = -(-len(array) // chunk_size)
    padded = np.full((chunks * chunk_size,) + array.shape[1:], fill, array.dtype)
    padded[:len(array)] = array
    return padded.reshape((chunks, chunk_size) + array.shape[1:])


def _mesh_and_batch(queries: np.ndarray, mesh: Mesh | None, batch_size: int
                    ) -> tuple[Mesh, int]:
    mesh = parallel.create_mesh(jax.local_devices()[:1]) if mesh is None else mesh
    return mesh, parallel.round_up_to_devices(max(1, min(batch_size, len(queries))), mesh)


def manifold_radii(features: np.ndarray, k: int = NEAREST_K, mesh: Mesh | None = None,
                   batch_size: int = ROW_BATCH, chunk_size: int = COLUMN_CHUNK) -> np.ndarray:
    """r_k(phi)^2 for every row phi of features [N, D] (float32 [N]); needs N > k."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) <= k:
        raise ValueError(f"manifold_radii needs [N, D] features with N > k = {k}, got shape "
                         f"{features.shape}")
    mesh, batch = _mesh_and_batch(features, mesh, batch_size)
    chunk = max(1, min(chunk_size, len(features)))
    chunks = parallel.replicate(_chunked(features, chunk, 0.0), mesh)
    valid = parallel.replicate(_chunked(np.ones(len(features), bool), chunk, False), mesh)
    return parallel.map_batches(lambda i, rows: _kth_smallest(rows, chunks, valid, k=k),
                                (features,), batch, mesh)


def in_manifold(queries: np.ndarray, features: np.ndarray, radii: np.ndarray,
                mesh: Mesh | None = None, batch_size: int = ROW_BATCH,
                chunk_size: int = COLUMN_CHUNK) -> np.ndarray:
    """bool [M]: whether each query [M, D] lies within sqrt(radii[j]) of some features[j]."""
    queries, features = np.asarray(queries, np.float32), np.asarray(features, np.float32)
    mesh, batch = _mesh_and_batch(queries, mesh, batch_size)
    chunk = max(1, min(chunk_size, len(features)))
    chunks = parallel.replicate(_chunked(features, chunk, 0.0), mesh)
    chunk_radii = parallel.replicate(_chunked(np.asarray(radii, np.float32), chunk, -1.0), mesh)
    return parallel.map_batches(lambda i, rows: _covered(rows, chunks, chunk_radii),
                                (queries,), batch, mesh)


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = NEAREST_K,
                     mesh: Mesh | None = None, batch_size: int = ROW_BATCH,
                     chunk_size: int = COLUMN_CHUNK) -> tuple[float, float]:
    """(precision, recall) of `generated` [M, D] against `real` [N, D] (module docstring), both
    sets needing more than k rows."""
    real, generated = np.asarray(real, np.float32), np.asarray(generated, np.float32)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"precision_recall needs [N, D] and [M, D] features, got {real.shape} "
                         f"and {generated.shape}")
    sizes = dict(mesh=mesh, batch_size=batch_size, chunk_size=chunk_size)
    precision = in_manifold(generated, real, manifold_radii(real, k, **sizes), **sizes)
    recall = in_manifold(real, generated, manifold_radii(generated, k, **sizes), **sizes)
    return float(np.mean(precision)), float(np.mean(recall))
