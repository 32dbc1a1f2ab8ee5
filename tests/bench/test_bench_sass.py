"""`python -m bench.run --sass`: the SASS reader on hand-written listings (exact counts), the
occupancy arithmetic on hand cases, the model's two regimes, and one end-to-end run of the command
(one kernel, one target) checking the structure of its JSON, not today's kernels' numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nearl_bench import cli
from nearl_bench.loop_trips import loop_trips
from nearl_bench.occupancy import occupancy, waves
from nearl_bench.sass_model import PARAMS, segment_time, tensor_cycles
from nearl_bench.sass_parse import instruction_class, mma_flops, mma_precision, parse_sass
from nearl_bench.sass_summary import summarise_sass, weighted_mix

ROOT = Path(__file__).resolve().parents[2]

# Triton's listing format (CompiledKernel.asm["sass"]): control codes, a tab, the instruction.
PIPELINED = """Function:pipelined
--:-:0:-:1\tLDC R1, c[0x0][0x28];
--:-:-:-:1\tLDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64];
--:-:0:-:1\tLDGDEPBAR;
LBB0:
--:-:-:Y:4\tDEPBAR.LE SB0, 0x1;
--:-:-:-:1\tLDGSTS.E.BYPASS.128 [R2+0x1000], desc[UR4][R6.64], P3;
--:-:0:-:1\tLDGDEPBAR;
--:-:-:-:4\tLDSM.16.M88.4 R8, [R3];
02:-:-:Y:6\tWARPGROUP.ARRIVE;
--:-:-:-:3\tHGMMA.64x16x8.F32.TF32 R16, R8, gdesc[UR8], R16, gsb0;
--:-:-:-:1\tIADD3 R5, R5, 0x1, RZ;
--:-:-:Y:2\tISETP.GE.AND P0, PT, R5, UR6, PT;
--:-:-:-:5\t@!P0 BRA LBB0;
--:-:-:-:1\tSTG.E.128 desc[UR4][R10.64], R16;
--:-:-:-:5\tEXIT;
LBB1:
--:-:-:Y:0\tBRA LBB1;
"""

PLAIN = """Function:plain
--:-:0:-:1\tLDC R1, c[0x0][0x28];
--:-:-:-:1\t@P1 BRA LBB0;
LBB1:
--:-:2:-:1\t@P3 LDG.E.128 R60, desc[UR12][R74.64];
--:-:3:-:1\tLDG.E R64, desc[UR12][R76.64];
04:-:-:-:1\tFFMA R0, R60, R64, R0;
--:-:-:-:1\tSHFL.BFLY PT, R2, R0, 0x1, 0x1f;
--:-:-:-:1\tSHFL.BFLY PT, R3, R2, 0x2, 0x1f;
--:-:-:-:1\tHMMA.16816.F32.BF16 R20, R4, R8, R20;
--:-:-:-:5\t@!P0 BRA LBB1;
LBB0:
--:-:-:-:1\tSHFL.IDX PT, R2, R0, RZ, 0x1f;
--:-:-:-:5\tEXIT;
"""

NESTED = """Function:nested
--:-:-:-:1\tMOV R0, RZ;
LBB0:
--:-:-:-:1\tLDG.E R1, desc[UR4][R2.64];
LBB1:
--:-:-:-:1\tFADD R0, R0, R1;
--:-:-:-:1\tUIADD3 UR4, UR4, 0x1, URZ;
--:-:-:-:5\t@P0 BRA LBB1;
--:-:-:-:1\tIMAD R2, R2, 0x4, RZ;
--:-:-:-:5\t@P1 BRA LBB0;
--:-:-:-:5\tEXIT;
"""

# cuobjdump -sass's own format: addresses, encodings, branch targets as addresses.
RAW = """        code for sm_90
                Function : raw
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                   /* 0x00000a00ff017b82 */
                                                                            /* 0x000fe20000000800 */
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;             /* 0x0000000404027981 */
                                                                            /* 0x000ea8000c1e1900 */
        /*0020*/                   LDGSTS.E [R3], desc[UR4][R6.64] ;        /* 0x0000000006037fae */
                                                                            /* 0x0001e8000b9a1004 */
        /*0030*/               @!P0 BRA 0x10 ;                              /* 0xfffffffc00008947 */
                                                                            /* 0x000fea000383ffff */
        /*0040*/                   EXIT ;                                   /* 0x000000000000794d */
                                                                            /* 0x000fea0003800000 */
        /*0050*/                   BRA 0x50;                                /* 0xfffffffc00fc7947 */
"""


# ------------------------------------------------------------------------------------------ the reader
def test_a_pipelined_loop_counts_its_async_copies_and_wgmma():
    listing = parse_sass(PIPELINED)
    assert len(listing.instrs) == 15
    assert [(lp.start, lp.end, lp.depth) for lp in listing.loops] == [(3, 11, 1)]  # the trap BRA LBB1 is none
    s = summarise_sass(PIPELINED)
    assert s["async_copies_in_loops"] is True
    assert s["in_loops"] == {"LDG": 0, "LDGSTS": 1, "UTMALDG": 0, "UBLKCP": 0, "LDGDEPBAR": 1, "HMMA": 0,
                             "HGMMA": 1, "SHFL": 0, "LDL": 0, "STL": 0, "other MMA": 0}
    assert s["straight"]["instructions"] == 6 and s["loops"][0]["instructions"] == 9
    assert s["loops"][0]["mma"] == {"HGMMA.64x16x8.F32.TF32": 1}


def test_a_plain_loop_has_no_async_copies_and_counts_loads_hmma_and_shfl():
    s = summarise_sass(PLAIN)
    assert len(s["loops"]) == 1  # the forward branch over the loop is no loop
    assert s["async_copies_in_loops"] is False
    il = s["in_loops"]
    assert (il["LDG"], il["LDGSTS"], il["HMMA"], il["HGMMA"], il["SHFL"]) == (2, 0, 1, 0, 2)
    assert s["straight"]["ops"] == {"LDC": 1, "BRA": 1, "SHFL": 1, "EXIT": 1}


def test_nested_loops_have_depths_and_own_bodies():
    listing = parse_sass(NESTED)
    assert [(lp.start, lp.end, lp.depth, lp.parent) for lp in listing.loops] == [(1, 6, 1, None), (2, 4, 2, 0)]
    assert [listing.depth(i) for i in range(len(listing.instrs))] == [0, 1, 2, 2, 2, 1, 1, 0]
    s = summarise_sass(NESTED)
    assert [lp["instructions"] for lp in s["loops"]] == [3, 3]
    # outer body once per trip, the inner at its outer loop's trips (its own count is unknown)
    mix = weighted_mix(s, lambda depth: 10)
    assert mix["global load"] == {"static": 1, "in_loops": 1, "weighted": 10.0, "share": pytest.approx(10 / 62)}
    assert mix["int/address"]["static"] == 2 and mix["int/address"]["weighted"] == 20.0  # UIADD3 and IMAD
    assert mix["other"]["static"] == 4 and mix["other"]["weighted"] == 22.0  # MOV, EXIT, 2 BRA (one in each loop)
    assert sum(m["weighted"] for m in mix.values()) == 62.0


def test_cuobjdump_format_with_addresses():
    s = summarise_sass(RAW)
    assert [(lp["start"], lp["end"]) for lp in s["loops"]] == [(1, 3)]
    assert s["in_loops"]["LDG"] == 1 and s["in_loops"]["LDGSTS"] == 1 and s["async_copies_in_loops"]
    assert s["instructions"] == 6


def test_mma_shapes_precisions_and_classes():
    assert mma_flops("HMMA.16816.F32.BF16") == 2 * 16 * 8 * 16
    assert mma_flops("HMMA.1688.F32.TF32") == 2 * 16 * 8 * 8
    assert mma_flops("HGMMA.64x16x8.F32.TF32") == 2 * 64 * 16 * 8 / 4  # per warp of the warpgroup
    assert mma_flops("FFMA") == 0
    assert [mma_precision(op) for op in ("HMMA.1688.F32.TF32", "HGMMA.64x64x16.F32.BF16", "HMMA.16816.F16.F16",
                                         "QGMMA.64x64x32.F32.E4M3.E4M3")] == ["tf32", "16bit", "16bit", "fp8"]
    assert [instruction_class(op) for op in ("LDGSTS", "LDSM", "UIMAD", "ULDC", "WARPGROUP", "MUFU", "STL")] == [
        "async copy", "shared", "int/address", "other", "barrier", "FP32", "local (spill)"]


# ------------------------------------------------------------------------------------------ occupancy
@pytest.mark.parametrize("regs,warps,shared,ctas,warps_sm,limit", [
    (255, 8, 0, 1, 8, "registers"),          # 256 x 32 = 8192 a warp: 8 warps fit
    (128, 4, 0, 4, 16, "registers"),
    (32, 4, 100 * 1024, 2, 8, "shared"),     # (100 KB + 1 KB) twice in 228 KB
    (32, 32, 0, 2, 64, "registers=warps"),
    (16, 1, 0, 32, 32, "CTAs"),
    (33, 8, 0, 6, 48, "registers"),          # 33 -> 40 a thread: 1280 a warp, 51 warps
    (64, 4, 228 * 1024, 0, 0, "does not fit"),
])
def test_occupancy_hand_cases(regs, warps, shared, ctas, warps_sm, limit):
    occ = occupancy(regs, warps, shared, cc=90)
    assert (occ["ctas_per_sm"], occ["warps_per_sm"], occ["limit"]) == (ctas, warps_sm, limit)


def test_waves_and_sm80_shared_memory():
    assert waves(256, 1, 132) == 2 and waves(768, 1, 132) == 6 and waves(132, 2, 132) == 1 and waves(5, 0, 132) == 0
    assert occupancy(32, 4, 100 * 1024, cc=80)["ctas_per_sm"] == 1  # 164 KB on sm_80


def test_loop_trip_rules():
    assert loop_trips({"BLOCK_DC": 32}, {"D": 768, "N": 197}, (1, 256)) == (24, "column chunks: cdiv(D=768, BLOCK_DC=32)")
    assert loop_trips({"BLOCK_C": 128}, {"d": 512, "D": 128}, (1, 2))[0] == 4  # the layer's width is d
    assert loop_trips({"BLOCK_DC": 256}, {"D": 768, "n_tiles": 13}, (3, 2, 256))[0] == 7
    assert loop_trips({}, {"tiles_per_split": 5}, (3, 256))[0] == 5
    assert loop_trips({}, {}, (1,)) == (1, "no rule: loops counted once")


# ------------------------------------------------------------------------------------------ the model
def test_model_adds_latency_in_series_and_hides_it_when_pipelined():
    opt, _ = PARAMS[90]
    seg = {"instructions": 100, "ops": {"LDG": 1}, "mma": {}}
    t = segment_time(seg, warps=8, resident=1, stages=3, p=opt)
    assert (t["cycles"], t["binds"], t["pipelined"]) == (opt.load_latency + 200, "latency", False)
    t = segment_time(seg, warps=8, resident=5, stages=3, p=opt)  # five CTAs share the issue slots
    assert t["cycles"] == 1000 and t["binds"] == "issue"
    seg = {"instructions": 100, "ops": {"LDGSTS": 1}, "mma": {}}
    t = segment_time(seg, warps=8, resident=1, stages=3, p=opt)  # two loads in flight ahead: half the latency
    assert opt.load_latency == 600 and (t["cycles"], t["binds"], t["pipelined"]) == (300, "latency", True)
    t = segment_time(dict(seg, ops={"LDGSTS": 1}), warps=8, resident=1, stages=3, p=opt, straight=True)
    assert t["cycles"] == 800 and not t["pipelined"]  # straight-line code waits for its loads
    # wgmma at the peak, mma.sync at its share: 8 warps x 4096 ops at 2048 tf32 ops a cycle
    assert tensor_cycles({"HGMMA.64x16x8.F32.TF32": 1}, 8, opt) == pytest.approx(8 * 4096 / 2048)
    assert tensor_cycles({"HMMA.1688.F32.TF32": 1}, 8, opt) == pytest.approx(8 * 2048 / (2048 * opt.mma_sync_share))


# ------------------------------------------------------------------------------------------ the command
def test_sass_rejects_bad_options(capsys):
    for argv, words in ((["--kernel", "model", "--sass"], "--sass"), (["--kernel", "oca", "--sass", "--traffic"], "--traffic"),
                        (["--kernel", "oca", "--sass", "--providers", "split"], "split"),
                        (["--kernel", "layer", "--sass", "--providers", "reference"], "--sass models"),
                        (["--kernel", "oca", "--sass", "--target", "70"], "--target"),
                        (["--kernel", "oca", "--target", "80"], "--sass")):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert words in capsys.readouterr().err


def test_sass_command_end_to_end_oca_forward(tmp_path):
    """As a user runs it: one kernel (the OCA forward), one target; the JSON's structure, and no
    compile cache or scratch left behind."""
    pytest.importorskip("triton")
    out = tmp_path / "sass.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NEARL_TILING", "NEARL_SM_COUNT")}
    env["TMPDIR"] = str(scratch)
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--kernel", "oca", "--sass", "--shape", "vit-b16",
                           "--mode", "fwd", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MODEL, NOT A MEASUREMENT" in proc.stdout and "async copies in loops" in proc.stdout
    mine = [p.name for p in scratch.iterdir() if p.name.startswith("nearl_sass")]  # torch leaves its own
    assert not mine, f"the kernel cache or the scratch folder was left behind: {mine}"
    payload = json.loads(out.read_text())
    assert payload["tiling"]["tiling"] == "h100" and payload["tiling"]["sm_count"] == 132 and payload["targets"] == [90]
    rows = payload["rows"]
    assert [(r["provider"], r["mode"], r["kernel"], r["cc"]) for r in rows] == [("triton", "fwd", "_oca_fwd_kernel", 90)]
    row = rows[0]
    assert row["status"] == "ok" and row["grid"][-1] == 256 and row["grid_ctas"] >= 256
    assert isinstance(row["n_regs"], int) and 0 < row["n_regs"] <= 255 and row["spill_stores"] is not None
    occ = row["occupancy"]
    assert occ["warps_per_sm"] == occ["ctas_per_sm"] * row["num_warps"] and occ["ctas_per_sm"] >= 1
    assert isinstance(row["async_copies_in_loops"], bool) and isinstance(row["loops"], list) and row["trips"] >= 1
    assert all(isinstance(row[k], int) for k in ("num_warps", "num_stages", "shared"))
    assert set(row["in_loops"]) >= {"LDG", "LDGSTS", "UTMALDG", "UBLKCP", "LDGDEPBAR", "HMMA", "HGMMA", "other MMA"}
    assert row["waves"] == -(-row["grid_ctas"] // (occ["ctas_per_sm"] * 132))
    assert abs(sum(m["share"] for m in row["mix"].values()) - 1) < 1e-9
    model = payload["model"]
    assert set(model["params"]) == {"optimistic", "pessimistic"} and "NOT A MEASUREMENT" in model["note"]
    (op,) = model["ops"]
    assert (op["provider"], op["mode"]) == ("triton", "fwd")
    for name in ("optimistic", "pessimistic"):
        assert op["total_s"][name] > 0 and op["vs_minimum"][name] >= 1  # the floor's minimum is a floor
        (kernel,) = op["kernels"]
        assert kernel["sets"][name]["seconds"] >= kernel["sets"][name]["floor_s"] > 0
    assert op["total_s"]["pessimistic"] >= op["total_s"]["optimistic"]
