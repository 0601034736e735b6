from core.hardware import cpu_flags, fast_bfloat16


def test_bfloat16_is_fast_on_a_gpu_or_a_cpu_with_bf16_instructions(monkeypatch):
    assert fast_bfloat16("cuda:0")
    for flags, expected in ((frozenset({"avx2", "avx512_bf16"}), True), (frozenset({"amx_bf16"}), True),
                            (frozenset({"avx2", "avx512f"}), False), (frozenset(), False)):
        monkeypatch.setattr("core.hardware.cpu_flags", lambda flags=flags: flags)
        assert fast_bfloat16("cpu") is expected, flags


def test_cpu_flags_are_read_from_proc_cpuinfo():
    flags = cpu_flags()
    assert isinstance(flags, frozenset) and all(" " not in f for f in flags)
