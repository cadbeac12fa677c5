"""Data logic: sources, the case table, image readers, pseudo-masks, preprocessing, splits and the training
loader (everything between raw files and model-ready batches).

It sits below the model: nothing here imports ``segevo.model`` or ``segevo.losses``, so a DataLoader worker
never loads peft or the network (``tests/test_layering.py``); the model reads the task vocabulary from here.
"""
