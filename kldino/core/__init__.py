"""The method's math: objective, train step and its builder, prior pass, optimizer, guard, mesh."""
