"""Development tools outside the runtime packages: the synthetic dataset generator and the local Kafka
broker launcher (jars from Maven Central)."""
