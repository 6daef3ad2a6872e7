"""Placeholder section until the schedule core lands: says so plainly."""


def run(quick, out):
    print("schedule table: not built yet (foundation issue in progress)")
