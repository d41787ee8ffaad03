"""Model shapes to run with random weights: the `--preset` of the benchmark, the quality
report and the server."""

from __future__ import annotations

from mistral_jax.args import ModelArgs, MoeArgs, QueryScaleArgs, YarnArgs

_SHAPES_7B = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32,
                  n_kv_heads=8, norm_eps=1e-5, rope_theta=1e6)

PRESETS: dict[str, ModelArgs] = {
    # CPU-sized shapes for CI and quick checks.
    "tiny": ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                      norm_eps=1e-5, vocab_size=512),
    "tiny-moe": ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4,
                          n_kv_heads=2, norm_eps=1e-5, vocab_size=512, moe=MoeArgs(4, 2)),
    "small": ModelArgs(dim=512, n_layers=8, head_dim=64, hidden_dim=1536, n_heads=8,
                       n_kv_heads=2, norm_eps=1e-5, vocab_size=32768),  # 58M params
    "small-moe": ModelArgs(dim=512, n_layers=8, head_dim=64, hidden_dim=1536, n_heads=8,
                           n_kv_heads=2, norm_eps=1e-5, vocab_size=32768,
                           moe=MoeArgs(8, 2)),  # 190M params, 151M in experts
    # Published shapes (params.json of the released checkpoints).
    "mistral-7b": ModelArgs(**_SHAPES_7B, vocab_size=32768),  # Mistral-7B-v0.3
    "mixtral-8x7b": ModelArgs(**_SHAPES_7B, vocab_size=32000, moe=MoeArgs(8, 2)),
    "codestral-22b": ModelArgs(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384,
                               n_heads=48, n_kv_heads=8, norm_eps=1e-5, vocab_size=32768,
                               rope_theta=1e6),
    # Ministral-8B-Instruct-2410: 3 of every 4 layers windowed (32k), the 4th full; 128k context.
    "ministral-8b": ModelArgs(dim=4096, n_layers=36, head_dim=128, hidden_dim=12288, n_heads=32,
                              n_kv_heads=8, norm_eps=1e-5, vocab_size=131072, rope_theta=1e8,
                              sliding_window=(32768, 32768, 32768, None)),
    # Mistral-Nemo-Base-2407: head_dim 128 while dim / n_heads = 160.
    "nemo-12b": ModelArgs(dim=5120, n_layers=40, head_dim=128, hidden_dim=14336, n_heads=32,
                          n_kv_heads=8, norm_eps=1e-5, vocab_size=131072, rope_theta=1e6),
    # Mistral-Small-24B-Base-2501 (the language model of Small 3.1 / 3.2 is this shape).
    "small-24b": ModelArgs(dim=5120, n_layers=40, head_dim=128, hidden_dim=32768, n_heads=32,
                           n_kv_heads=8, norm_eps=1e-5, vocab_size=131072, rope_theta=1e8),
    # Ministral-3-14B's language model; rope as Ministral3Config's default (YaRN x16 over 16k,
    # query scale beta 0.1, theta 1e6).
    "ministral3-14b": ModelArgs(dim=5120, n_layers=40, head_dim=128, hidden_dim=16384,
                                n_heads=32, n_kv_heads=8, norm_eps=1e-5, vocab_size=131072,
                                rope_theta=1e6, max_seq_len=262144,
                                yarn=YarnArgs(factor=16.0, original_max_position_embeddings=16384),
                                llama_4_scaling=QueryScaleArgs(0.1, 16384)),
}
