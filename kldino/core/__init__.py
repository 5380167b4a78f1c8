"""The method's math: the objective and its normalisations, the train step and the program that
builds it, the prior pass, the optimizer, the schedules, the collapse guard and the sharding."""
