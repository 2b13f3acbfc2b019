"""Pure settlement core of gpumeter: pricing, voucher netting, invoices and receivables.

No I/O, no clock, no globals: plain data in, plain data out. See README.md.
"""
