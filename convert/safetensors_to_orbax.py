"""Convert a Mistral or Hugging Face safetensors folder into an Orbax checkpoint folder.

    python -m convert.safetensors_to_orbax SRC DST [--dtype bfloat16] [--format auto|mistral|hf]
                                           [--quantize int8|fp8|fp8-tensor] [--force] [--verify]
    mistral-jax-convert SRC DST ...

DST then loads with `Transformer.from_folder(DST)`. With --quantize the attention and
feed-forward weights are written quantized (int8 / fp8 kernels + float32 scales), as
`Transformer.from_folder(SRC, quantize=...)` would hold them; a compressed-tensors (fp8 /
int8) source is written quantized as stored, without --quantize. Exit status 0 on success, 2 on bad
input (a one-line error naming the file at fault), 130 when interrupted (SIGINT, Ctrl-C), 143
when terminated (SIGTERM); in every failure DST is left as it was (absent, or the previous
checkpoint). A signal is acted on at the next tensor or chunk (mistral_jax.convert.convert).
--force replaces only a converted checkpoint or an empty folder, once the new one is complete.
"""

from __future__ import annotations

import argparse
import signal
import sys

from mistral_jax.errors import MistralJaxError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mistral-jax-convert",
        description="Convert a Mistral (params.json + consolidated*.safetensors) or Hugging Face "
                    "(config.json + model*.safetensors) folder into an Orbax checkpoint folder, "
                    "optionally quantized (--quantize).")
    p.add_argument("src", help="source model folder")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", default="bfloat16", help="weight dtype: bfloat16 (default), "
                   "float16 or float32")
    p.add_argument("--format", default="auto", choices=("auto", "mistral", "hf"),
                   help="source layout (auto: params.json -> mistral, else config.json -> "
                        "hf; params.json wins when both are there)")
    p.add_argument("--quantize", default=None, choices=("int8", "fp8", "fp8-tensor"),
                   help="write the attention / feed-forward weights quantized: int8 or fp8 "
                        "(e4m3) with a float32 scale per output channel, or fp8-tensor (one "
                        "scale per weight); the other weights stay in --dtype. Not for "
                        "compressed-tensors sources, which are written quantized as stored")
    p.add_argument("--force", action="store_true",
                   help="replace DST if it is a converted checkpoint (it has "
                        "mistral_jax_checkpoint.json) or an empty folder; anything else at DST "
                        "is never deleted (remove it yourself)")
    p.add_argument("--verify", action="store_true",
                   help="read every tensor back and compare it with the source (cast, and "
                        "quantized again with --quantize) before finishing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class _Terminated(BaseException):
    """SIGTERM: unwinds like KeyboardInterrupt, so that the partial output is removed."""


def _terminate(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    opts = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        from mistral_jax.convert import convert

        stats = convert(opts.src, opts.dst, dtype=opts.dtype, layout=opts.format,
                        quantize=opts.quantize, force=opts.force, verify=opts.verify,
                        progress=not opts.quiet)
    except (MistralJaxError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the destination was left as it was", file=sys.stderr)
        return 128 + signal.SIGINT
    except _Terminated:
        print("terminated; the destination was left as it was", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
