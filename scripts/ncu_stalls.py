#!/usr/bin/env python3
"""Summarizes Nsight Compute per-instruction warp-state sampling of a W4A16 GEMM launch.

Usage: ncu_stalls.py SASS_CSV[.xz]  (from `ncu -i R.ncu-rep --page source --csv --print-source sass`,
the report taken with `--section SourceCounters`). Prints the consumer main loop's share of the samples
(from the first full-barrier wait before the first wgmma to the unit's final wgmma wait), its samples
by stall reason and opcode, and its top instructions. Samples no reason accounts for are the warps
waiting at an HGMMA to issue it."""
import csv, sys, re, lzma
def load(path):
    rows=list(csv.reader((lzma.open(path, "rt") if path.endswith(".xz") else open(path))))
    name=rows[0][1]; hdr=rows[1]; data=rows[2:]
    return name,hdr,data
name,hdr,data=load(sys.argv[1])
ix={h:i for i,h in enumerate(hdr)}
reasons=[h for h in hdr if h.startswith('stall_') and '(Not Issued)' not in h]
src=[r[ix['Source']].strip() for r in data]
samp=[int(r[ix['Warp Stall Sampling (All Samples)']] or 0) for r in data]
tot=sum(samp)
# The consumer main loop: from the last full-barrier wait before the first HGMMA (the first
# tile's dequantization) to the unit's final wgmma wait.
first_h=next(i for i,s in enumerate(src) if s.startswith('HGMMA') or ' HGMMA' in s)
start=max(i for i in range(first_h) if 'PHASECHK' in src[i] or 'TRYWAIT' in src[i])
end=next(i for i,s in enumerate(src) if 'DEPBAR.LE gsb0, 0x0' in s)
park=sum(samp[i] for i,s in enumerate(src) if 'UCGABAR_WAIT' in s)
main=sum(samp[start:end+1])
print(f"{name}: total samples {tot}; producer parked at the cluster barrier {park} ({100*park/tot:.1f}%); consumer main loop {main} ({100*main/tot:.1f}%); rest {tot-park-main} ({100*(tot-park-main)/tot:.1f}%)")
agg={}
unrep=0
for i in range(start,end+1):
    r=data[i]; s=0
    for h in reasons:
        v=int(r[ix[h]] or 0); agg[h]=agg.get(h,0)+v; s+=v
    unrep+=samp[i]-s
print("  main loop by reason: "+", ".join(f"{h[6:]} {100*v/main:.1f}%" for h,v in sorted(agg.items(),key=lambda x:-x[1]) if v>0.005*main)+f", unreported (at an HGMMA waiting to issue) {100*unrep/main:.1f}%")
top=sorted(range(start,end+1),key=lambda i:-samp[i])[:8]
for i in top:
    r=data[i]; best=max(reasons,key=lambda h:int(r[ix[h]] or 0)); bv=int(r[ix[best]] or 0)
    why=best[6:] if bv*2>=samp[i] else 'mostly unreported' if samp[i]-sum(int(r[ix[h]] or 0) for h in reasons)>samp[i]/2 else 'mixed'
    print(f"    {100*samp[i]/main:5.1f}%  {src[i][:60]}  ({why})")
# Samples by opcode (predicates and modifiers dropped).
cls={}
for i in range(start,end+1):
    op=src[i].split()[0] if not src[i].startswith('@') else src[i].split()[1]
    op=op.split('.')[0]
    cls[op]=cls.get(op,0)+samp[i]
print("  main loop by opcode: "+", ".join(f"{k} {100*v/main:.1f}%" for k,v in sorted(cls.items(),key=lambda x:-x[1])[:10]))
