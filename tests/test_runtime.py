"""Machine facts: /proc/cpuinfo parsing, ISA flags, BLAS names, the benchmark header line."""
from __future__ import annotations

import json
import os

import pytest

from ernie_vl import runtime

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Test CPU
flags\t\t: fpu sse avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: other
flags\t\t: fpu
"""


def test_parse_cpuinfo_reads_the_first_processor():
    model, vendor, flags = runtime.parse_cpuinfo(CPUINFO)
    assert model == "Intel(R) Xeon(R) Test CPU" and vendor == "GenuineIntel"
    assert {"avx2", "avx512_vnni", "amx_tile"} <= flags and "avx512_fp16" not in flags
    cpu = runtime.CpuInfo(model, vendor, flags, 2)
    assert cpu.isa == ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    assert cpu.is_intel and not cpu.is_amd
    assert runtime.CpuInfo("x", "AuthenticAMD").is_amd


def test_parse_cpuinfo_of_arm_and_of_nothing():
    model, vendor, flags = runtime.parse_cpuinfo("processor : 0\nFeatures : fp asimd sve\n")
    assert flags == {"fp", "asimd", "sve"} and model == "" and vendor == ""
    assert runtime.parse_cpuinfo("") == ("", "", frozenset())


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo")
def test_cpu_info_reads_this_machine():
    cpu = runtime.cpu_info()
    with open("/proc/cpuinfo") as f:
        text = f.read()
    assert cpu.model and cpu.model in text
    assert cpu.vendor in text and cpu.cores >= 1
    assert runtime.has_isa(next(iter(cpu.flags))) if cpu.flags else True
    assert not runtime.has_isa("no_such_flag")


def test_machine_facts_are_plain_json_and_the_line_names_the_cpu():
    facts = runtime.machine_facts()
    assert json.loads(json.dumps(facts)) == facts
    assert set(facts["isa"]) == set(runtime.ISA_FLAGS)
    assert facts["torch_blas"] == runtime.torch_blas()
    assert facts["threads"]["torch_intra_op"] >= 1
    line = runtime.machine_line()
    assert runtime.cpu_info().model in line and facts["torch"] in line
