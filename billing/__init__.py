"""Settlement, invoices and payments: ``core`` (pure rules), ``app`` (one function per staff task,
usage read through ``app.ports``), ``adapters`` (store and SQL, files, ClickHouse usage, statement
files) and ``cli``. See README.md; the rules are in docs/billing-rules.md."""
