"""Operations: settings, the CLI and workers, administration, reports, the ledger's checks, metrics."""
