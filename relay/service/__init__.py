"""What every role runs in: one lifecycle (`lifecycle`), the service routes and JSON errors
(`app`), the queue gauges (`gauges`), and serving until SIGTERM (`runner`)."""
