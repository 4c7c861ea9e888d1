"""Faults: SIGKILL inside a file write and inside a stage, then resume; a full disk (a small tmpfs
where one can be mounted, else RLIMIT_FSIZE, which makes writes fail with EFBIG); and the check
that every file moa_jax writes goes through write-then-rename."""

import ast
import contextlib
import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moa_jax import workdir as workdir_lib
from moa_jax.plans.plan import Plan
from moa_jax.workdir import DiskFullError, Workdir, atomic_path, atomic_write, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SEED = 15
# The tiny compress config with one sample per length and one Pareto interval.
SMALL = [
  "--config=configs/compress.py:tiny",
  "--config.calibration.samples_per_length=1",
  "--config.optimize.intervals=1",
  "--config.select.num_samples=1",
]
STAGES = ("calibration", "profile", "optimize", "choose")

# Runs the CLI with a fault: 'write K' kills the process inside its K-th atomic file write (the
# temporary file half written, not yet renamed); 'stage K' kills it inside stage K after the
# stage wrote all its outputs but before they were published; 'fsize N' limits files to N bytes.
INJECTOR = textwrap.dedent("""
    import contextlib, dataclasses, os, resource, signal, sys
    from moa_jax import pipeline, workdir
    mode, k, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    writes = [0]
    real_atomic_path = workdir.atomic_path

    def die():
      os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def dying_atomic_path(path):
      with real_atomic_path(path) as tmp:
        yield tmp
        writes[0] += 1
        if writes[0] == k:
          os.truncate(tmp, os.path.getsize(tmp) // 2)
          die()

    def dying(build):
      def run(run, out):
        build(run, out)
        die()
      return run

    if mode == "write":
      workdir.atomic_path = dying_atomic_path
    elif mode == "stage":
      stages = list(pipeline.STAGES)
      stages[k] = dataclasses.replace(stages[k], build=dying(stages[k].build))
      pipeline.STAGES = tuple(stages)
    elif mode == "fsize":
      resource.setrlimit(resource.RLIMIT_FSIZE, (k, k))
    from moa_jax.__main__ import main
    main(["moa_jax", *argv])
    """)


def _cli(args, *, fault=("none", 0), timeout=420):
  return subprocess.run(
    [sys.executable, "-c", INJECTOR, fault[0], str(fault[1]), *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _complete(work: Path) -> list[str]:
  return [s for s in STAGES if (work / s / workdir_lib.COMPLETE).is_file()]


def _stray_files(work: Path) -> list[str]:
  """Temporary files left where a reader could look: anything hidden that is not inside (or
  is not) a top-level .<name>.partial-* entry, which the next run discards."""
  return [
    str(p.relative_to(work))
    for p in work.rglob(".*")
    if ".partial-" not in p.relative_to(work).parts[0]
  ]


def _snapshot(work: Path) -> dict[str, bytes]:
  return {
    str(p.relative_to(work)): p.read_bytes()
    for p in sorted(work.rglob("*"))
    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(work).parts)
  }


@pytest.mark.slow
def test_compress_killed_in_a_write_and_in_a_stage_resumes_and_survives_a_full_disk(tmp_path):
  """One workdir through four runs: killed inside a random file write (seeded), killed inside a
  random later stage, resumed to the end (only unfinished stages recomputed); then a changed
  'select' section on a disk that takes no file over 16 kB (the plots are larger): one error
  line, every earlier result byte-identical."""
  rng = random.Random(SEED)
  work = tmp_path / "run"
  args = ["compress", *SMALL, f"--workdir={work}"]

  killed = _cli(args, fault=("write", rng.randint(1, 5)))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert not (work / "plan.json").exists() and not _stray_files(work)
  done = _complete(work)
  stage = rng.randint(len(done), len(STAGES) - 1)
  killed = _cli(args, fault=("stage", stage))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  for name in done:
    assert f"{name}: complete, skipped" in killed.stdout
  assert _complete(work) == list(STAGES[:stage]) and not _stray_files(work)

  resumed = _cli(args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for name in STAGES:
    skipped = f"{name}: complete, skipped" in resumed.stdout
    assert skipped == (name in STAGES[:stage]), (name, resumed.stdout)
  assert not _stray_files(work) and not list(work.glob(".*"))
  plan = Plan.load(work / "plan.json")
  assert plan.kv_densities and plan.provenance["calibration"]

  before = _snapshot(work)
  changed = [*args, "--config.select.num_samples=2"]
  full = _cli(changed, fault=("fsize", 16 * 1024))
  assert full.returncode == 1, full.stderr[-3000:]
  lines = full.stderr.strip().splitlines()
  assert (
    lines[-1].startswith("error: File too large while writing ") and "Traceback" not in full.stderr
  ), full.stderr[-3000:]
  assert "earlier results are intact" in lines[-1]
  assert _snapshot(work) == before and not _stray_files(work)


# --------------------------------------------------------------------------- atomic writes


def _kill_mid_write(target: Path, text: str) -> int:
  """A child that writes half of `text` through atomic_write and is SIGKILLed there."""
  code = textwrap.dedent(f"""
      import os, signal, sys
      from moa_jax.workdir import atomic_write
      def write(f):
        f.write({text[: len(text) // 2]!r}.encode())
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
      atomic_write({str(target)!r}, write)
      """)
  return subprocess.run([sys.executable, "-c", code], timeout=60).returncode


def test_a_write_killed_midway_leaves_the_old_file(tmp_path):
  target = tmp_path / "plan.json"
  atomic_write_text(target, "old")
  assert _kill_mid_write(target, "new content " * 100) == -signal.SIGKILL
  assert target.read_text() == "old"
  leftovers = [p.name for p in tmp_path.iterdir() if p.name != "plan.json"]
  assert len(leftovers) == 1 and leftovers[0].startswith(".plan.json.partial-")  # never read
  Workdir(tmp_path)  # its writer is gone: discarded
  assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
  atomic_write_text(target, "new")
  assert target.read_text() == "new"


def test_atomic_path_renames_only_on_success_with_plain_file_permissions(tmp_path):
  target = tmp_path / "sub" / "x.bin"
  with pytest.raises(RuntimeError):
    with atomic_path(target) as tmp:
      tmp.write_bytes(b"half")
      raise RuntimeError("failed while writing")
  assert not target.exists() and list(target.parent.iterdir()) == []
  with atomic_path(target) as tmp:
    tmp.write_bytes(b"whole")
  assert target.read_bytes() == b"whole"
  umask = os.umask(0)
  os.umask(umask)
  assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@contextlib.contextmanager
def _small_disk(tmp_path: Path, size: int):
  """A directory on a full-able tmpfs of `size` bytes (root and mount(8) needed), else skip."""
  mount = tmp_path / "disk"
  mount.mkdir()
  result = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
    capture_output=True,
    text=True,
  )
  if result.returncode:
    pytest.skip(
      f"cannot mount a tmpfs here ({result.stderr.strip()}); the RLIMIT_FSIZE tests "
      "cover the full-disk path"
    )
  try:
    yield mount
  finally:
    subprocess.run(["umount", str(mount)], check=True)


def test_full_tmpfs_is_one_line_and_keeps_the_old_file_and_stage(tmp_path):
  with _small_disk(tmp_path, 64 * 1024) as disk:
    atomic_write_text(disk / "plan.json", "old")
    with pytest.raises(DiskFullError) as error:
      atomic_write(disk / "plan.json", lambda f: f.write(b"x" * 200_000))
    assert error.value.errno == errno.ENOSPC and "\n" not in str(error.value)
    assert str(error.value).startswith("No space left on device while writing ")
    assert sorted(p.name for p in disk.iterdir()) == ["plan.json"]
    assert (disk / "plan.json").read_text() == "old"

    work = Workdir(disk / "work")
    with work.stage("profile", "k1") as out:
      (out / "influence.npz").write_bytes(b"1" * 1000)
    with pytest.raises(DiskFullError, match="while writing stage profile"):
      with work.stage("profile", "k2") as out:
        (out / "influence.npz").write_bytes(b"2" * 200_000)  # a plain write inside a stage
    assert work.is_complete("profile", "k1")
    assert (work.path("profile") / "influence.npz").read_bytes() == b"1" * 1000
    assert [p.name for p in work.root.iterdir()] == ["profile"]


def test_file_size_limit_is_one_line_and_keeps_the_old_file(tmp_path):
  code = textwrap.dedent(f"""
      import resource
      from moa_jax.workdir import atomic_write_text
      resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
      atomic_write_text({str(tmp_path / "plan.json")!r}, "x" * 5000)
      """)
  atomic_write_text(tmp_path / "plan.json", "old")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert (
    result.returncode == 1
    and "DiskFullError: File too large while writing" in result.stderr.strip().splitlines()[-1]
  )
  assert (tmp_path / "plan.json").read_text() == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


# ------------------------------------------------------------------------------- workdir


def test_a_published_stage_replaces_the_old_one_whole(tmp_path):
  work = Workdir(tmp_path)
  with work.stage("optimize", "k1") as out:
    (out / "a.json").write_text("1")
  with work.stage("optimize", "k2") as out:
    (out / "b.json").write_text("2")
  assert sorted(p.name for p in work.path("optimize").iterdir()) == ["COMPLETE.json", "b.json"]
  assert work.is_complete("optimize", "k2") and list(tmp_path.glob(".*")) == []


def test_a_truncated_or_garbled_stage_is_not_complete(tmp_path):
  work = Workdir(tmp_path)
  with work.stage("profile", "k") as out:
    (out / "influence.npz").write_bytes(b"x" * 100)
  os.truncate(work.path("profile") / "influence.npz", 50)  # a crash of the disk, not of us
  assert not work.is_complete("profile", "k")
  (work.path("profile") / "influence.npz").write_bytes(b"x" * 100)
  assert work.is_complete("profile", "k")
  (work.path("profile") / workdir_lib.COMPLETE).write_text('{"fingerprint": "k"')
  assert not work.is_complete("profile", "k")


def test_stale_partial_folders_are_discarded(tmp_path):
  (tmp_path / ".profile.partial-abc").mkdir()
  (tmp_path / ".profile.partial-abc" / "influence.npz").write_text("half")
  (tmp_path / ".choose-old.partial-1@elsewhere~xyz" / "choose").mkdir(parents=True)
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    host = workdir_lib._HOST
    (tmp_path / f".optimize.partial-{live.pid}@{host}~abc").mkdir()  # a live writer's
    (tmp_path / f".plan.json.partial-{2**22 + 1}@{host}~abc").write_text("{")  # no such pid
    Workdir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
      ".choose-old.partial-1@elsewhere~xyz",
      f".optimize.partial-{live.pid}@{host}~abc",
    ]
  finally:
    live.kill()
    live.wait()
  Workdir(tmp_path)
  assert [p.name for p in tmp_path.iterdir()] == [".choose-old.partial-1@elsewhere~xyz"]


# ------------------------------------------------------- every write is write-then-rename

WRITERS = {"write_text", "write_bytes", "savefig", "save_file", "to_csv"}
NUMPY_WRITERS = {"save", "savez", "savez_compressed", "savetxt"}  # np.<name>(path, ...)
# (module, function, the file written) allowed without a rename, with the reason.
ALLOWED = {
  (
    "moa_jax/train/trainer.py",
    "train",
    "workdir / 'train_log.jsonl'",
  ): "an append-only training log (a crash can tear only its last line)",
  ("moa_jax/sweep/launchers.py", "run", "log"): "a job's output, streamed while it runs",
}


def _writes(tree: ast.AST):
  """(function name, line, call, file) of every file-writing call outside atomic_write and
  atomic_path."""
  found = []

  def visit(node, function, protected):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      function = node.name
    if isinstance(node, ast.Call):
      name = (
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
      )
      numpy = (
        isinstance(node.func, ast.Attribute)
        and name in NUMPY_WRITERS
        and ast.unparse(node.func.value) in ("np", "numpy")
      )
      if name in ("atomic_write", "atomic_path"):
        protected = True
      elif not protected and (
        name in WRITERS
        or numpy
        or (
          name in ("open", "fdopen")
          and any(
            isinstance(a, ast.Constant) and isinstance(a.value, str) and set(a.value) & set("wax")
            for a in [*node.args[1:2], *[k.value for k in node.keywords if k.arg == "mode"]]
          )
        )
      ):
        target = ast.unparse(node.args[0]) if node.args else ""
        found.append((function, node.lineno, ast.unparse(node.func), target))
    if isinstance(node, (ast.With, ast.AsyncWith)) and any(
      isinstance(item.context_expr, ast.Call)
      and "atomic_path" in ast.unparse(item.context_expr.func)
      for item in node.items
    ):
      protected = True
    for child in ast.iter_child_nodes(node):
      visit(child, function, protected)

  visit(tree, "", False)
  return found


def test_every_file_written_by_moa_jax_goes_through_write_then_rename():
  unsafe = []
  for path in sorted((REPO / "moa_jax").rglob("*.py")):
    module = str(path.relative_to(REPO))
    for function, line, call, target in _writes(ast.parse(path.read_text())):
      if (module, function, target) not in ALLOWED:
        unsafe.append(f"{module}:{line} {call}() in {function}()")
  assert not unsafe, (
    "write these through moa_jax.workdir.atomic_write / atomic_path (or add "
    "them to ALLOWED with the reason): " + "; ".join(unsafe)
  )


def test_the_write_check_sees_unsafe_writes():
  code = textwrap.dedent("""
      def f(path, fig, np, a):
        path.write_text("x")
        with open(path, "w") as g:
          g.write("x")
        fig.savefig(path)
        np.savez(path, a=a)
        atomic_write(path, lambda g: np.savez(g, a=a))
        with atomic_path(path) as tmp:
          fig.savefig(tmp)
        with open(path) as g:
          g.read()
      """)
  assert [line for _, line, _, _ in _writes(ast.parse(code))] == [3, 4, 6, 7]
