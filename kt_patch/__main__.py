"""``python -m kt_patch bench`` (kernel benchmark) and ``python -m kt_patch doctor`` (what this machine runs)."""
import sys


def doctor():
    import torch

    from . import options
    from .kernel import supported_isas

    opts = options.resolve()
    isas = supported_isas()
    print(f"kt_patch doctor\n  isas available : {', '.join(isas)}\n  isa chosen     : "
          f"{isas[0] if opts.isa == 'auto' else opts.isa}\n  threads        : {opts.threads} "
          f"(physical cores available: {options.physical_cores_available()})\n  torch          : {torch.__version__}"
          f" (cuda available: {torch.cuda.is_available()})")


def main(argv):
    if argv[:1] == ["bench"]:
        from .bench import main as bench

        return bench(argv[1:])
    if argv[:1] == ["doctor"]:
        return doctor()
    print("usage: python -m kt_patch {bench,doctor} [options]", file=sys.stderr)
    return 2


sys.exit(main(sys.argv[1:]))
