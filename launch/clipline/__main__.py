from clipline.launch.cli import main

raise SystemExit(main())
