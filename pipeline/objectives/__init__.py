"""Objectives: VDM and GAN losses as plain modules (no processes, no backends).

The contract the loop may use is :mod:`pipeline.objectives.base`; which objective a config
names is resolved by :mod:`pipeline.objectives.registry`. Each objective is a package
(``vdm/``, ``gan/``) whose ``config`` module is torch-free.
"""
