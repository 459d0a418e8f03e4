"""The execution adapter, the one place Ray appears: the Ray Data stages of a run (stages:
init, actor pools, read, tokenize, embed, write) and their Datasource/Datasink (ray_io).

May import: config, io, model, methods.
"""
