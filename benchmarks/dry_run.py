"""Check that a command run_gpu.sh would run imports and parses its arguments, without running it:
    python -m benchmarks.dry_run MODULE [ARGS...]      e.g.  benchmarks.bench_step --pairs 2 --seq-len 1024
imports MODULE, calls its main(ARGS) and stops at the first parse_args, which must accept ARGS."""

import argparse
import importlib
import sys


class _Parsed(Exception):
    pass


def check(module: str, args: list) -> str:
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        ns = real(self, argv, namespace)  # exits with argparse's own message on a bad argument
        raise _Parsed(ns)

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        importlib.import_module(module).main(args)
    except _Parsed as parsed:
        return f"{module} {' '.join(args)}: imports, arguments parse ({vars(parsed.args[0])})"
    finally:
        argparse.ArgumentParser.parse_args = real
    raise SystemExit(f"{module}: main() returned without parsing its arguments")


if __name__ == "__main__":
    print(check(sys.argv[1], sys.argv[2:]))
