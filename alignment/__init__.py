"""Alignment: data, reward models, trainers (SFT, DPO, MODPO, soup) and evaluation. No HTTP, no Ray."""
