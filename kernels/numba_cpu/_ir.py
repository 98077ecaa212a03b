"""LLVM IR building blocks shared by the kernels that write their inner loops as IR (``@intrinsic``
code generators: batch norm's streaming lines, the 8-bit state's vector block coders)."""

from __future__ import annotations

__all__ = ["counted_loop"]


def counted_loop(builder, start, stop, step, body, carried=()):
    """``for i in range(start, stop, step)`` as an IR loop (step > 0; ``i`` of start's type),
    carrying the values ``carried`` through ``body(i, carried) -> carried``; returns the carried
    values at the end. The builder is left after the loop."""
    entry = builder.block
    header = builder.append_basic_block("loop_head")
    step_block = builder.append_basic_block("loop_body")
    done = builder.append_basic_block("loop_done")
    builder.branch(header)
    builder.position_at_end(header)
    i = builder.phi(start.type)
    i.add_incoming(start, entry)
    phis = []
    for value in carried:
        phi = builder.phi(value.type)
        phi.add_incoming(value, entry)
        phis.append(phi)
    builder.cbranch(builder.icmp_signed("<", i, stop), step_block, done)
    builder.position_at_end(step_block)
    updated = body(i, phis)
    i_next = builder.add(i, step)
    tail = builder.block
    builder.branch(header)
    i.add_incoming(i_next, tail)
    for phi, value in zip(phis, updated):
        phi.add_incoming(value, tail)
    builder.position_at_end(done)
    return phis
