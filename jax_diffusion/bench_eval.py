"""--mode=bench part `eval`: placeholder replaced below."""
