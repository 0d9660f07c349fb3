"""Time base timm models against their ``*_dec`` twins; same as ``timm-dec bench overhead``.

    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py [--repeats 10] [--models vit_small_patch16_224 ...]
        [--batch-size 8] [--img-size 224] [--device cuda] [--json bench_overhead.json]
"""
import argparse
import sys

from timm_dec import bench


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(["overhead", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
