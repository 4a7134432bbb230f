"""starref: reference models, data, trainer and exporter for the seed architectures starserve serves."""
