"""Flax NNX module of the MesaNet block (optional: ``pip install 'mesacli[flax]'``), to drop into an NNX model.

``MesaNet`` holds the parameters of ``mesacli.lm.mesanet_block`` as ``nnx.Param``s, one attribute per entry of
``mesanet_block.init``'s dict (created by that function: the same initialisation), and its ``__call__`` is
``mesanet_block.apply`` on them (the same maths, in one place).  For every head, with the block input x_t [E]:

    H_t = gamma_t H_{t-1} + beta_t k_t k_t^T,   G_t = gamma_t G_{t-1} + beta_t v_t k_t^T,
    o_t = G_t (H_t + diag Lambda)^{-1} q_t,     y_t = W_o [RMSNorm(o_t) * s * SiLU(W_g x_t)]

with q, k from short causal convolutions, SiLU and L2 normalisation, beta_t, gamma_t sigmoid gates and
Lambda = softplus(p) + 0.25 (``mesanet_block``'s docstring has the rest).  No residual connection, no
LayerNorm: the module maps the (normalised) residual stream x [B, T, E] to the block's update y [B, T, E].

``init_state`` / ``decode_step`` are the recurrent form (constant memory per token, exact solve whatever
``solver``), equal to ``__call__``'s y_t token by token.

Flax is imported here only: ``import mesacli`` and the rest of the package never import it.

Shapes: B batch, T time, E embedding, H heads, D key/value size.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

try:
    from flax import nnx
except ImportError as error:  # pragma: no cover - exercised by tests/test_nnx.py with flax hidden
    raise ImportError("mesacli.nnx needs Flax: pip install 'mesacli[flax]'") from error

from mesacli.errors import MesaError
from mesacli.lm import mesanet_block
from mesacli.lm.mesanet_block import MesaNetBlockState
from mesacli.mesanet import SOLVERS


class MesaNet(nnx.Module):
    """The MesaNet block as an NNX module: ``y_BTE = MesaNet(E, H, D, rngs=nnx.Rngs(0))(x_BTE)``.

    solver: "exact" (chunked Cholesky) | "cg" (conjugate gradient to ||r|| <= cg_tol ||q||) | "cg_fixed"
    (30 CG steps, flash-linear-attention's approximation); chunk_size: tokens per chunk of the op;
    output_gate: y = W_o [RMSNorm(o) * s * SiLU(W_g x)] (False: W_o [RMSNorm(o) * s], no w_g);
    std: init std of the matrices and taps, res_std: of W_o (default std).  Parameters: the entries of
    ``mesanet_block.init`` (w_q, w_k, w_v, w_g [E, H, D], w_o [H, D, E], conv_q, conv_k [4, H, D],
    w_beta, w_gamma [E, H], b_beta, b_gamma [H], lam_p [H D], norm_scale [D]), drawn from ``rngs.params()``."""

    def __init__(self, embed_dim: int, num_heads: int, key_size: int, *, rngs: nnx.Rngs, solver: str = "exact",
                 chunk_size: int = 64, cg_tol: float = 1e-4, output_gate: bool = True, std: float = 0.02,
                 res_std: Optional[float] = None):
        if solver not in SOLVERS:
            raise MesaError(f"MesaNet: solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        self.embed_dim, self.num_heads, self.key_size = embed_dim, num_heads, key_size
        self.solver, self.chunk_size, self.cg_tol = solver, chunk_size, cg_tol
        params = mesanet_block.init(rngs.params(), embed_dim, num_heads, key_size, std=std, res_std=res_std,
                                    output_gate=output_gate)
        self.param_names = tuple(params)
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))

    def block_params(self) -> mesanet_block.Params:
        """The parameters as ``mesanet_block``'s dict (the current values: traced inside nnx.grad / nnx.jit)."""
        return {name: getattr(self, name)[...] for name in self.param_names}

    def __call__(self, x_BTE: jax.Array, *, x_key_BTE: Optional[jax.Array] = None) -> jax.Array:
        """y [B, T, E] = ``mesanet_block.apply`` (x_key_BTE: the keys' input, default x, e.g. the previous
        token's for a key shift)."""
        return mesanet_block.apply(self.block_params(), x_BTE, x_key_BTE=x_key_BTE, solver=self.solver,
                                   chunk_size=self.chunk_size, cg_tol=self.cg_tol)[0]

    def init_state(self, batch: int, dtype=jnp.float32) -> MesaNetBlockState:
        """The empty recurrent state: convolution buffers [B, 3, H, D] and (H, G) [B, H, D, D]."""
        return mesanet_block.init_state(batch, self.num_heads, self.key_size, dtype)

    def decode_step(self, state: MesaNetBlockState, x_BE: jax.Array,
                    x_key_BE: Optional[jax.Array] = None) -> tuple[jax.Array, MesaNetBlockState]:
        """One token: (y [B, E], the new state) = ``mesanet_block.decode_step``."""
        return mesanet_block.decode_step(self.block_params(), state, x_BE, x_key_BE)
