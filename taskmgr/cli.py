def main() -> None:  # placeholder until the CLI lands
    raise SystemExit("taskmgr: not built yet")
