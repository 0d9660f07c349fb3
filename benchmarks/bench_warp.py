"""Time the monotone warp against the paper's composed path and x.clone(); same as ``timm-dec bench warp``.

    python benchmarks/bench_warp.py [--device cuda] [--repeats 10] [--json bench_warp.json]
"""
import argparse
import sys

from timm_dec import bench


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(["warp", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
