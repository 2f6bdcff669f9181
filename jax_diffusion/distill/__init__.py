"""Few-step students of a trained teacher (`--mode=distill`).

loop.py     the method table (progressive, consistency), their train steps and the loop
targets.py  the teachers' targets: DDIM and Heun/Euler ODE steps, the stage and consistency grids
"""
