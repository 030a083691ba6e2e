"""Adversarial end-to-end tests (issue 13): credentials reach only their own upstream, private
answers are never shared. Add a case here with every new route or upstream."""
