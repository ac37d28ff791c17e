"""refdir.workers"""
