"""Worker entry of ``ipex-lite-run --torchrun``.

torch.distributed.run starts this file once per local rank (and again on an elastic restart).
It applies that rank's part of the launcher's plan (environment, log file) and replaces itself
with the rank's command (the binding prefix and the program), so the process torchrun watches
is the program itself.  Standard library only: nothing may load torch or an allocator before
the exec, which is what makes LD_PRELOAD and the OpenMP variables take effect.
"""
import json
import os
import sys


def main() -> int:
    plan = json.loads(sys.argv[1])  # [{"argv": [...], "env": {...}, "log": path or null}] by local rank
    local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    if not 0 <= local_rank < len(plan):
        print(f"ipex-lite-run: LOCAL_RANK={local_rank} has no entry in the plan of {len(plan)} ranks",
              file=sys.stderr)
        return 2
    mine = plan[local_rank]
    env = dict(os.environ)
    env.update(mine["env"])
    if mine.get("log"):
        os.makedirs(os.path.dirname(mine["log"]) or ".", exist_ok=True)
        fd = os.open(mine["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # a restart appends
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        os.execvpe(mine["argv"][0], mine["argv"], env)
    except OSError as e:
        print(f"ipex-lite-run: cannot start rank {local_rank} ({' '.join(mine['argv'])}): {e}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
