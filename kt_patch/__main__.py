"""``python -m kt_patch {bench,doctor}``."""
import sys

from . import bench, doctor

USAGE = """usage: python -m kt_patch {bench,doctor} [options]

  bench    one MoE layer forward + backward with expert LoRA: the kernel beside a PyTorch bf16 reference
           (python -m kt_patch bench --help)
  doctor   what this machine runs (CPU, ISA backends, threads, versions) and, with --model PATH, the host memory a
           model's routed experts take (python -m kt_patch doctor --help)"""


def main(argv) -> int:
    if argv[:1] == ["bench"]:
        return bench.main(argv[1:]) or 0
    if argv[:1] == ["doctor"]:
        return doctor.main(argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
