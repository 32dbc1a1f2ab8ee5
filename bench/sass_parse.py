"""Reading a SASS listing: instructions, loops, and what is inside the loops.

Accepts Triton's listing (`CompiledKernel.asm["sass"]`: `ctrl<TAB>INSTR ;` lines, branch targets
named `LBB<n>` and labelled `LBB<n>:`) and the raw `cuobjdump -sass` / `nvdisasm` forms
(`/*0a30*/  INSTR ;  /* 0x... */`, targets as addresses or `.L_x_<n>` labels).

A loop is a backward branch: a `BRA` whose target comes before it (a branch to itself, the trap
after EXIT, is none); its body runs from the target to the branch. Two back-branches to one target
are one loop; a loop inside another's body is nested in it (depth 2, and so on). Every instruction
belongs to its innermost loop, or to the straight-line code (depth 0).

Instruction classes (by the opcode before its first '.', uniform-datapath `U` opcodes with the
non-uniform ones):
  global load   LDG, LD                      global store  STG, ST, RED, ATOM, ATOMG
  async copy    LDGSTS (cp.async), LDGDEPBAR, UTMALDG / UTMASTG / UTMAPF (TMA), UBLKCP / UBLKPF
  shared        LDS, STS, LDSM, STSM, ATOMS  local (spill) LDL, STL
  MMA           HMMA (mma.sync), HGMMA (wgmma), IMMA, DMMA, IGMMA, QGMMA, ...
  SHFL          SHFL                         barrier       BAR, DEPBAR, WARPSYNC, WARPGROUP, MEMBAR, FENCE,
                                                            SYNCS, BSSY, BSYNC, ERRBAR
  FP32          FFMA, FADD, FMUL, MUFU, FMNMX, FSETP, FSEL, FSET, FCHK, FRND, FSWZADD
  int/address   IMAD, IADD3, LEA, ISETP, LOP3, SHF, SEL, IABS, IMNMX, VIADD, VIMNMX, SGXT, ...
  other         moves, conversions, constants, special registers, control flow
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

CLASSES = ("global load", "global store", "async copy", "shared", "local (spill)", "MMA", "SHFL", "barrier",
           "FP32", "int/address", "other")
_CLASS_OF = {}
for _cls, _ops in (
        ("global load", "LDG LD"),
        ("global store", "STG ST RED ATOM ATOMG REDG"),
        ("async copy", "LDGSTS LDGDEPBAR UTMALDG UTMASTG UTMAPF UTMAREDG UBLKCP UBLKPF UBLKRED"),
        ("shared", "LDS STS LDSM STSM ATOMS"),
        ("local (spill)", "LDL STL"),
        ("MMA", "HMMA IMMA DMMA BMMA HGMMA IGMMA QGMMA BGMMA OMMA QMMA UTCHMMA UTCIMMA UTCQMMA UTCOMMA"),
        ("SHFL", "SHFL"),
        ("barrier", "BAR DEPBAR WARPSYNC WARPGROUP MEMBAR FENCE SYNCS BSSY BSYNC ERRBAR ARRIVES"),
        ("FP32", "FFMA FADD FMUL MUFU FMNMX FSETP FSEL FSET FCHK FRND FSWZADD FMNMX3 FADD2 FFMA2 FMUL2"),
        ("int/address", "IMAD IADD3 IADD LEA ISETP LOP3 LOP SHF SHL SHR SEL IABS IMNMX VIADD VIMNMX SGXT "
                        "BMSK BREV FLO POPC IMUL IDP ISCADD VIADDMNMX IMNMX3 P2R R2P PLOP3"),
):
    for _op in _ops.split():
        _CLASS_OF[_op] = _cls
ASYNC_COPY = ("LDGSTS", "UTMALDG", "UBLKCP")  # the copies that put loads in flight across iterations
MMA_WARPGROUP = ("HGMMA", "IGMMA", "QGMMA", "BGMMA")  # one instruction per warpgroup of 4 warps

_CTRL = re.compile(r"^[-\d]{2}:[-\d]:[-\d]:[-Y]:[0-9a-fA-F]\s+")  # Triton's control-code column
_ADDR = re.compile(r"^/\*([0-9a-fA-F]{4,})\*/\s*")  # cuobjdump's address column
_COMMENT = re.compile(r"/\*.*?\*/")
_LABEL = re.compile(r"^\.?([A-Za-z_$][\w$.]*):$")
_INSTR = re.compile(r"^(?:(@!?U?P(?:T|\d+))\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*(.*?)\s*;$")


@dataclass
class Instr:
    index: int
    opcode: str             # e.g. "LDG.E.128"
    base: str               # e.g. "LDG"
    predicate: str          # "@!P0" or ""
    operands: str
    target: Union[str, int, None] = None  # a branch's target: label name or address

    @property
    def cls(self) -> str:
        return instruction_class(self.base)


@dataclass
class Loop:
    start: int    # index of the first instruction of the body (the branch target)
    end: int      # index of the backward branch
    depth: int = 1
    parent: Optional[int] = None  # index into Listing.loops of the enclosing loop


@dataclass
class Listing:
    instrs: List[Instr]
    loops: List[Loop] = field(default_factory=list)
    loop_of: List[Optional[int]] = field(default_factory=list)  # innermost loop of each instruction

    def depth(self, i: int) -> int:
        loop = self.loop_of[i]
        return 0 if loop is None else self.loops[loop].depth

    def in_loops(self) -> List[Instr]:
        return [ins for ins in self.instrs if self.loop_of[ins.index] is not None]


def instruction_class(base: str) -> str:
    if base in _CLASS_OF:
        return _CLASS_OF[base]
    if base.startswith("U") and base[1:] in _CLASS_OF and _CLASS_OF[base[1:]] == "int/address":
        return "int/address"  # the uniform datapath's integer ops (UIMAD, UIADD3, ULEA, ...)
    return "other"


def _branch_target(opcode_base: str, operands: str) -> Union[str, int, None]:
    if opcode_base != "BRA" or not operands:
        return None
    last = operands.split(",")[-1].strip().strip("`()").strip()
    if re.fullmatch(r"0x[0-9a-fA-F]+", last):
        return int(last, 16)
    return last.lstrip(".") or None


def _read_lines(text: str):
    """(instructions, label name -> index, address -> index)."""
    instrs: List[Instr] = []
    labels: Dict[str, int] = {}
    addrs: Dict[int, int] = {}
    for raw in text.splitlines():
        line = _CTRL.sub("", raw.strip())
        addr = _ADDR.match(line)
        if addr:
            line = line[addr.end():]
        line = _COMMENT.sub("", line).strip()
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instrs)
            continue
        m = _INSTR.match(line)
        if not m:
            continue  # headers, encodings, blank lines
        index = len(instrs)
        addrs[int(addr.group(1), 16) if addr else 16 * index] = index
        opcode = m.group(2)
        base = opcode.split(".")[0]
        instrs.append(Instr(index, opcode, base, m.group(1) or "", m.group(3),
                            _branch_target(base, m.group(3))))
    return instrs, labels, addrs


def parse_sass(text: str) -> Listing:
    """The listing's instructions and its loops (see the module docstring)."""
    instrs, labels, addrs = _read_lines(text)
    ends: Dict[int, int] = {}
    for ins in instrs:
        if ins.target is None:
            continue
        start = labels.get(ins.target) if isinstance(ins.target, str) else addrs.get(ins.target)
        if start is not None and start < ins.index:
            ends[start] = max(ends.get(start, start), ins.index)
    loops = sorted((Loop(s, e) for s, e in ends.items()), key=lambda lp: (lp.start, -lp.end))
    for i, loop in enumerate(loops):
        outer = [j for j, o in enumerate(loops[:i]) if o.start <= loop.start and loop.end <= o.end]
        if outer:
            loop.parent = max(outer, key=lambda j: loops[j].start)  # the innermost enclosing one
            loop.depth = loops[loop.parent].depth + 1
    loop_of: List[Optional[int]] = [None] * len(instrs)
    for i, loop in enumerate(loops):  # outer loops come first, so inner ones overwrite them
        for k in range(loop.start, loop.end + 1):
            loop_of[k] = i
    return Listing(instrs, loops, loop_of)


def mma_flops(opcode: str) -> float:
    """Floating-point (or integer) operations of one warp's instruction: HMMA.16816 is a 16x8x16
    product per warp (2*16*8*16); HGMMA.64x16x8 a 64x16x8 product per warpgroup, a quarter of it
    per warp. 0 for what is not an MMA or has a shape this does not know."""
    parts = opcode.split(".")
    base, shape = parts[0], (parts[1] if len(parts) > 1 else "")
    dims = re.fullmatch(r"(\d+)x(\d+)x(\d+)", shape)
    if dims and base in MMA_WARPGROUP:
        m, n, k = (int(v) for v in dims.groups())
        return 2.0 * m * n * k / 4
    if base in ("HMMA", "IMMA", "DMMA", "BMMA") and shape.isdigit():
        m = 16 if shape.startswith("16") else 8
        rest = shape[len(str(m)):]
        n, k = int(rest[0]), int(rest[1:] or 0)
        return 2.0 * m * n * k
    return 0.0


def mma_precision(opcode: str) -> str:
    """'tf32', '16bit' (bf16 / fp16), 'fp8', 'int8', 'fp64' or 'other', from the operand type."""
    up = opcode.upper().split(".")
    if "TF32" in up:
        return "tf32"
    if "BF16" in up or "F16" in up:
        return "16bit"
    if "E4M3" in up or "E5M2" in up:
        return "fp8"
    if "S8" in up or "U8" in up:
        return "int8"
    if up[0] == "DMMA" or "F64" in up:
        return "fp64"
    return "other"


def opcode_counts(instrs: List[Instr]) -> Counter:
    return Counter(ins.base for ins in instrs)


__all__ = ["parse_sass", "Listing", "Loop", "Instr", "instruction_class", "mma_flops", "mma_precision",
           "opcode_counts", "CLASSES", "ASYNC_COPY", "MMA_WARPGROUP"]
