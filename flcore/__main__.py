from flcore.cli import main

main()
