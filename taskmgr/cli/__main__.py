from taskmgr.cli import main

main()
