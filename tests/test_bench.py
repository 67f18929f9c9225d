"""bench.py runs its three subcommands on CPU, and the decode benchmark measures what it claims: the
student's recurrent state stays flat with the context while the teacher's KV cache grows, and the
roofline counts the bytes a step reads and writes.

    python -m pytest -x -q tests/test_bench.py
"""
import pytest

import bench
import teacher as teacher_lib
from conftest import perturbed
from model import Student
from sample import StudentDecoder, TeacherDecoder
from teacher import Teacher


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
    cache = {(r["T"], r["B"]): (r["student"]["cache_mib"], r["teacher"]["cache_mib"]) for r in rows}
    for B in (1, 2):
        assert cache[32, B][0] == cache[8, B][0] > 0               # state: flat
        assert cache[32, B][1] > cache[8, B][1] > 0                # KV cache: grows
    assert all(0 < r[m]["roofline_ms"] < r[m]["ms"] for r in rows for m in ("student", "teacher"))


def test_generate_roofline_bytes_and_no_prefill(capsys):
    """--shape (random weights) --no-prefill starts every row at position T. The roofline's bytes,
    counted here from the parameters by name: the student reads every weight but its embedding table
    (untied: B rows of it), the tied teacher every weight once; the student reads and writes its
    state, the teacher reads the T cached positions and writes one."""
    rows = bench.main(["generate", "--shape", "tiny", "--variant", "rwkv6", "--lengths", "16", "--batches", "2",
                       "--tokens", "2", "--no-prefill", "--device", "cpu"])
    assert "no prompt read" in capsys.readouterr().out and len(rows) == 1
    t = Teacher(bench.MODEL_SHAPES["tiny"])
    s = Student.from_teacher(t, "rwkv6")
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    assert bench.weight_bytes(s) == nbytes(p for n, p in s.named_parameters() if n != "embed_tokens.weight")
    assert bench.weight_bytes(t) == nbytes(t.parameters()) == nbytes(dict(t.named_parameters()).values())
    student, teacher = StudentDecoder(s, s.init_state(2)), TeacherDecoder(t, 2, 40)
    teacher.pos = 16
    c = t.cfg
    assert bench.step_bytes(student) == 2 * student.cache_bytes() == 2 * rows[0]["student"]["cache_mib"] * 2**20
    B, fp32_bytes = 2, 4                                     # k and v, 16 positions read + 1 written
    assert bench.step_bytes(teacher) == 2 * c.n_layers * B * c.n_kv_heads * c.head_dim * fp32_bytes * 17
