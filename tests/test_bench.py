"""bench.py runs its three subcommands on CPU, and the decode benchmark measures what it claims: the
student's recurrent state stays flat with the context while the teacher's KV cache grows.

    python -m pytest -x -q tests/test_bench.py
"""
import pytest

import bench
import teacher as teacher_lib
from conftest import perturbed
from model import Student


@pytest.fixture(scope="module")
def ckpt(tiny_hf_llama, tmp_path_factory):
    """A perturbed RAD-RWKV7 student of the tiny llama teacher, saved by Student.save."""
    teacher, _ = teacher_lib.load_teacher(tiny_hf_llama)
    folder = tmp_path_factory.mktemp("bench") / "student"
    perturbed(Student.from_teacher(teacher, "rwkv7"), seed=1).save(folder)
    return folder


def test_kernels_cpu_rows(capsys):
    """`bench.py kernels` on CPU: a row per variant and backend (naive, chunked torch)."""
    bench.main(["kernels", "--shapes", "smol-L512", "--reps", "1", "--threads", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("smol-L512")]
    assert [(r[5], r[6]) for r in rows] == [("rwkv7", "naive"), ("rwkv7", "torch"), ("rwkv6", "naive"),
                                           ("rwkv6", "torch")]


@pytest.mark.parametrize("step", ["1", "2"])
def test_train_prints_throughput(step, capsys):
    """`bench.py train` on random weights of a shape (tiny here; smol / q3b on a GPU)."""
    bench.main(["train", "--shape", "tiny", "--step", step, "--ctx", "32", "--updates", "2"])
    out = capsys.readouterr().out
    assert f"bench step {step} shape tiny" in out and "tokens/s per device" in out and "FLOP/token =" in out


def test_generate_student_cache_is_flat(ckpt, tiny_hf_llama, capsys):
    """`bench.py generate`: the student's state does not grow with the context, the teacher's KV cache does."""
    rows = bench.main(["generate", "--ckpt", str(ckpt), "--teacher", str(tiny_hf_llama), "--lengths", "8,32",
                       "--batches", "1,2", "--tokens", "2", "--prefill-chunk", "16", "--device", "cpu"])
    assert len(rows) == 4 and "teacher tok/s" in capsys.readouterr().out
    cache = {(r["T"], r["B"]): (r["student"][2], r["teacher"][2]) for r in rows}   # MB
    for B in (1, 2):
        assert cache[32, B][0] == cache[8, B][0] > 0               # state: flat
        assert cache[32, B][1] > cache[8, B][1] > 0                # KV cache: grows
